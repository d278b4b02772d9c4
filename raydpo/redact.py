"""Secrets out of everything raydpo writes or prints: config.yaml, error lines, MLflow params and tags.

`redact(text)` hides the password of any `scheme://user:password@host` URL and the value of every
environment variable whose name says it is a secret (TOKEN, PASSWORD, SECRET, KEY, CREDENTIAL) wherever
it appears. `redact_mapping(d)` does that to every string in a nested mapping and also hides the value
of any key named like a secret (`password`, `api_key`, `auth_token`, ...). Pure: it imports nothing from
raydpo and changes nothing; only the environment is read, at each call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# scheme://user:password@ : the password runs to the last '@' before the path (raw '@' in passwords too).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<pw>[^/?#\s]*)@")
_SECRET_ENV_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
_MIN_ENV_SECRET = 6  # shorter values ("1", "true", "false") are settings, not secrets
# A key is a secret when its last word is one of these (`auth_token`, `db-password`, `apiKey`), or it
# is one of the run-together forms below; `max_new_tokens`, `tokenizer`, `monkey` are not.
_SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "credential", "credentials")
_SECRET_KEY = re.compile(rf"(?:^|[_\-\s])(?:{'|'.join(_SECRET_WORDS)})$")
_SECRET_JOINED = {"apikey", "authtoken", "accesstoken", "secretkey", "accesskey", "privatekey"}


def _environ_snapshot() -> dict[str, str]:
    """A copy of os.environ; another thread (MLflow's telemetry, say) may change it while it is read,
    which makes a plain iteration raise, so a torn read is tried again."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return {}


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-named environment variables worth hiding, longest first."""
    env = _environ_snapshot() if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with URL passwords and secret environment values replaced by `***`."""
    if not text:
        return text
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@" if m["pw"] else m[0], text)
    for value in env_secrets():
        out = out.replace(value, MASK)
    return out


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a secret. For dotted keys (`tracking.api_key`) the last part counts."""
    if not isinstance(key, str):
        return False
    last = key.rsplit(".", 1)[-1]
    last = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", last).lower()  # apiKey -> api_key
    return bool(_SECRET_KEY.search(last)) or last in _SECRET_JOINED


def redact_mapping(d: Any) -> Any:
    """A copy of `d` (mappings, lists, tuples, scalars, nested) with every secret-named key's value
    replaced by `***` (None and "" stay as they are: nothing to hide) and every other string redacted."""
    if isinstance(d, Mapping):
        return {
            k: (MASK if v not in (None, "") else v) if is_secret_key(k) else redact_mapping(v)
            for k, v in d.items()
        }
    if isinstance(d, list):
        return [redact_mapping(v) for v in d]
    if isinstance(d, tuple):
        return tuple(redact_mapping(v) for v in d)
    if isinstance(d, str):
        return redact(d)
    return d

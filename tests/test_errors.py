"""User-facing errors that need no config: hub model names offline, joining a token-protected Ray."""

import http.server
import io
import socket
import threading
import time

import pytest
import ray
from huggingface_hub import constants as hf_constants

from raydpo.config import ModelConfig
from raydpo.engine import session
from raydpo.errors import ConfigError, UserError
from raydpo.models import loading

# ----------------------------------------------------------------------------- hub model names


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline by HF_HUB_OFFLINE=1, no remembered hub probe."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_unreachable", {})
    return cache


def cache_model(cache, repo_id: str, files=("config.json",)):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in files:
        (snap / f).write_text("{}")
    return snap


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_misspelt_hub_name_fails_fast_naming_the_field(hf_cache):
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        loading.resolve_model_path("gpt2-larg")
    assert time.monotonic() - t < 1
    msg = str(e.value)
    assert msg.startswith(
        "model.policy: 'gpt2-larg' is not a local directory and is not in the Hugging Face cache "
        "(offline: HF_HUB_OFFLINE=1); give a model directory"
    )
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"^model\.reference: 'gpt2-larg' is not a local directory"):
        loading.resolve_model_path("gpt2-larg", field="model.reference")


def test_transformers_offline_counts_too(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"\(offline: TRANSFORMERS_OFFLINE=1\)"):
        loading.resolve_model_path("gpt2-larg")


def test_loaders_blame_the_field_the_name_came_from(hf_cache):
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: 'gpt2-larg' is not"):
        loading.load_tokenizer(ModelConfig(policy="builtin:tiny-llama", tokenizer="gpt2-larg"))
    with pytest.raises(ConfigError, match=r"^model\.policy: 'gpt2-larg' is not"):
        loading.load_tokenizer(ModelConfig(policy="gpt2-larg"))
    with pytest.raises(ConfigError, match=r"^model\.reference: 'gpt2-larg' is not"):
        loading.load_reference(ModelConfig(policy="builtin:tiny-llama", reference="gpt2-larg"))
    with pytest.raises(ConfigError, match=r"^model\.policy: 'gpt2-larg' is not"):
        loading.load_reward_model(ModelConfig(policy="gpt2-larg"))
    with pytest.raises(ConfigError, match=r"^model\.policy: unknown builtin model 'builtin:nope'"):
        loading.resolve_model_path("builtin:nope")
    with pytest.raises(ConfigError, match=r"^model\.reference: path '/no/such/dir' does not exist"):
        loading.resolve_model_path("/no/such/dir", "model.reference")


def test_offline_cached_names_pass_and_near_misses_are_suggested(hf_cache):
    cache_model(hf_cache, "openai-community/gpt2-large")
    assert loading.resolve_model_path("openai-community/gpt2-large") == "openai-community/gpt2-large"
    with pytest.raises(ConfigError) as e:
        loading.resolve_model_path("openai-community/gpt2-larg")
    assert "did you mean 'openai-community/gpt2-large' (cached)? Else give a model directory" in str(e.value)
    # a tokenizer-only repo has tokenizer_config.json but no config.json
    cache_model(hf_cache, "org/tok", files=("tokenizer_config.json",))
    assert loading.resolve_model_path("org/tok", field="model.tokenizer") == "org/tok"
    with pytest.raises(ConfigError, match="^model.policy: 'org/tok' is not"):
        loading.resolve_model_path("org/tok")


def test_unreachable_hub_is_treated_as_offline(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        loading.resolve_model_path("gpt2-larg")
    assert time.monotonic() - t < loading._PROBE_TIMEOUT_S + 0.5
    assert f"(offline: cannot reach {endpoint}: " in str(e.value)
    # a cached model loads from its snapshot directory, so nothing retries the unreachable hub
    snap = cache_model(hf_cache, "org/model")
    assert loading.resolve_model_path("org/model") == str(snap)


def test_probe_is_bounded_even_when_the_server_never_answers():
    with socket.socket() as server:  # accepts connections (the backlog), never replies
        server.bind(("127.0.0.1", 0))
        server.listen()
        t = time.monotonic()
        why = loading._probe(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - t < 1.5
    assert why in ("timed out", "no answer within 0.5 s")


def test_probe_is_bounded_when_the_lookup_itself_hangs(monkeypatch):
    """A name lookup is not covered by the socket timeout: the probe gives up on its own."""
    hang = lambda *a, **k: time.sleep(5) or io.BytesIO()  # a response, late
    monkeypatch.setattr(loading.urllib.request, "urlopen", hang)
    t = time.monotonic()
    assert loading._probe("https://hub.invalid", timeout=0.5) == "no answer within 0.5 s"
    assert time.monotonic() - t < 1.5


def test_reachable_hub_leaves_the_name_to_the_loader(hf_cache, monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # any status is an answer
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert loading.resolve_model_path("gpt2-larg") == "gpt2-larg"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- Ray auth tokens

GCS_UNAUTHENTICATED = (
    "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
    "ray.exceptions.RpcError: Unauthenticated: InvalidAuthToken: Authentication token is missing or incorrect"
)


@pytest.fixture
def ray_address(monkeypatch, tmp_path):
    """RAY_ADDRESS at a port that accepts connections (check_ray_address passes); no token anywhere.
    Ray's session state is faked (a shared test Ray may be up in this process and must stay up)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    state = {"up": False}
    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "shutdown", lambda: state.update(up=False))
    yield address, state
    server.close()


def failing_init(state, exc_factory, half_joined=False):
    """A ray.init that raises what Ray raises; `half_joined`: after it had started the session."""

    def init(**kwargs):
        assert kwargs.get("address") is None  # joins RAY_ADDRESS (ray.init reads it itself)
        state["up"] = half_joined
        raise exc_factory()

    return init


def refused_by_gcs(address, inner=GCS_UNAUTHENTICATED):
    """What ray.init raises when joining: ConnectionError from the Node's RuntimeError."""
    try:
        raise RuntimeError(inner)
    except RuntimeError as e:
        try:
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}") from e
        except ConnectionError as outer:
            return outer


@pytest.mark.parametrize("half_joined", [False, True])
def test_cluster_that_wants_a_token_says_so(ray_address, monkeypatch, half_joined):
    address, state = ray_address
    monkeypatch.setattr(ray, "init", failing_init(state, lambda: refused_by_gcs(address), half_joined))
    with pytest.raises(UserError) as e:
        session.start_ray()
    assert str(e.value) == (
        f"cannot join Ray at {address}: the cluster requires a token; set RAY_AUTH_MODE=token and put "
        "the token in RAY_AUTH_TOKEN or ~/.ray/auth_token (ray get-auth-token)"
    )
    assert ray.is_initialized() is False


def test_token_mode_without_a_token_says_so(ray_address, monkeypatch):
    address, state = ray_address
    from ray._private.authentication.authentication_constants import (
        TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE,
    )
    from ray.exceptions import AuthenticationError

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setattr(
        ray,
        "init",
        failing_init(state, lambda: AuthenticationError(TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE)),
    )
    with pytest.raises(UserError, match=r"the cluster requires a token; set RAY_AUTH_MODE=token"):
        session.start_ray()


def test_rejected_token_names_where_it_came_from(ray_address, monkeypatch, tmp_path):
    address, state = ray_address
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("stale")
    monkeypatch.setattr(ray, "init", failing_init(state, lambda: refused_by_gcs(address)))
    with pytest.raises(UserError) as e:
        session.start_ray()
    assert str(e.value) == (
        f"cannot join Ray at {address}: the cluster rejected the token in ~/.ray/auth_token; "
        "use the cluster's token (ray get-auth-token on its head node)"
    )
    monkeypatch.setenv("RAY_AUTH_TOKEN", "also-stale")
    with pytest.raises(UserError, match="rejected the token in RAY_AUTH_TOKEN;"):
        session.start_ray()


def test_other_join_failures_keep_their_own_message(ray_address, monkeypatch):
    address, state = ray_address
    timeout = refused_by_gcs(address, "Failed to connect to GCS. Last connection error: timed out")
    monkeypatch.setattr(ray, "init", failing_init(state, lambda: timeout))
    with pytest.raises(UserError) as e:
        session.start_ray()
    assert (
        str(e.value) == f"cannot start or join Ray ({address}): Failed to connect to Ray cluster at {address}"
    )
    assert "token" not in str(e.value)

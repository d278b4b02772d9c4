"""Secrets and trust boundaries: no password or token is written or printed; remote model code runs only
when asked for; weights and YAML load without running code; names that become paths cannot escape."""

import ast
import os
import socket
from pathlib import Path

import pytest
import yaml

from raydpo.config import RunConfig, config_to_dict, dump_config, flatten, load_config
from raydpo.redact import is_secret_key, redact, redact_mapping

ROOT = Path(__file__).parents[1]
SOURCES = sorted((ROOT / "raydpo").rglob("*.py"))
TREES = {p: ast.parse(p.read_text(), str(p)) for p in SOURCES}


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


# ----------------------------------------------------------------------------- secrets


def test_redact_hides_url_passwords():
    assert redact("http://alice:s3cret@host:5000") == "http://alice:***@host:5000"
    assert redact("see https://u:p%40ss@h/x and sqlite:///a.db") == "see https://u:***@h/x and sqlite:///a.db"
    assert redact("postgresql://bob:pa@ss@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    assert (
        redact("'http://alice:s3cret@host:5000' is not reachable")
        == "'http://alice:***@host:5000' is not reachable"
    )
    for clean in ("http://host:5000/health", "http://user@host", "sqlite:////tmp/mlflow.db", "a:b@c", ""):
        assert redact(clean) == clean


def test_redact_hides_secret_environment_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123456")
    monkeypatch.setenv("MY_DB_Password", "hunter22")
    monkeypatch.setenv("SOME_API_KEY", "1")  # too short to be a secret: "1" must stay "1" everywhere
    monkeypatch.setenv("USE_CREDENTIALS", "true")
    text = "token hf_abcdef123456 and hunter22 failed 1 time: true"
    assert redact(text) == "token *** and *** failed 1 time: true"


def test_secret_key_names():
    secret = ["password", "api_key", "auth_token", "token", "secret", "key", "credential", "credentials",
              "aws_secret_access_key", "db-password", "apiKey", "authToken", "apikey",
              "tracking.api_key"]  # fmt: skip
    for key in secret:
        assert is_secret_key(key), key
    fields = flatten(config_to_dict(RunConfig()))
    for key in ("run_name", "max_prompt_length", "max_new_tokens", "tokenizer", "tokenize_workers", "kl_coef",
                "kl_target", "monkey", "keys", "tokens", "keyword", *fields):  # fmt: skip
        assert not is_secret_key(key), key


def test_redact_mapping(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcdef0123456789")
    d = {
        "tracking": {"tracking_uri": "http://alice:s3cret@host:5000", "api_key": "k-123", "auth_token": None},
        "password": 1234,
        "judge": {"headers": [{"Authorization": "Bearer abcdef0123456789"}], "kind": "reward"},
        "run_name": "dpo", "max_prompt_length": 256, "trust_remote_code": False,
    }  # fmt: skip
    assert redact_mapping(d) == {
        "tracking": {"tracking_uri": "http://alice:***@host:5000", "api_key": "***", "auth_token": None},
        "password": "***",
        "judge": {"headers": [{"Authorization": "Bearer ***"}], "kind": "reward"},
        "run_name": "dpo", "max_prompt_length": 256, "trust_remote_code": False,
    }  # fmt: skip
    assert d["tracking"]["api_key"] == "k-123"  # a copy: the input is left as it was


def test_config_yaml_never_holds_the_tracking_password(tmp_path):
    cfg = load_config(None, ["tracking.tracking_uri=http://alice:s3cret@mlflow.example:5000"])
    dump_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret" not in text and "http://alice:***@mlflow.example:5000" in text


def test_config_yaml_without_secrets_round_trips(tmp_path):
    cfg = load_config(
        None, ["run_name=r", "tracking.tracking_uri=http://mlflow.example:5000", "loss.beta=0.2"]
    )
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydpo: error: "), lines
    return lines[0]


def test_cli_error_line_is_redacted(monkeypatch, capsys):
    import raydpo.cli
    from raydpo.errors import UserError

    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-0123456789abcdef")

    def fail(args):
        raise UserError("http://alice:s3cret@host:5000 refused token tok-0123456789abcdef")

    monkeypatch.setattr(raydpo.cli, "_cmd_train", fail)
    assert raydpo.cli.main(["train"]) == 2
    assert _one_error_line(capsys) == "raydpo: error: http://alice:***@host:5000 refused token ***"


@pytest.mark.slow
def test_unreachable_server_with_credentials_is_printed_redacted(tmp_path, monkeypatch, capsys,
                                                                  tiny_llama_dir):  # fmt: skip
    """The real path: preflight's tracking check fails on a credentialed URI (a closed port)."""
    from raydpo.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    code = main(["train", f"model.policy={tiny_llama_dir}", f"tracking.tracking_uri={uri}",
                 f"train.output_dir={tmp_path / 'runs'}"])  # fmt: skip
    line = _one_error_line(capsys)
    assert code == 2 and "s3cret" not in line and "alice:***@127.0.0.1" in line, line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- trust boundaries

HF_LOADERS = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer")


@pytest.fixture
def hf_calls(monkeypatch):
    """(loader class name, kwargs) of every Hugging Face from_pretrained call; the load itself goes on."""
    import transformers

    calls = []
    for name in HF_LOADERS:
        cls = getattr(transformers, name)
        original = cls.from_pretrained

        def record(path, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_loaders_only_when_configured(hf_calls, tiny_llama_dir, trust):
    from raydpo.config import ModelConfig
    from raydpo.models.loading import load_policy, load_reference, load_reward_model, load_tokenizer

    cfg = ModelConfig(policy=str(tiny_llama_dir), trust_remote_code=trust)
    load_tokenizer(cfg), load_policy(cfg), load_reference(cfg), load_reward_model(cfg)
    causal, classifier = "AutoModelForCausalLM", "AutoModelForSequenceClassification"
    assert sorted(n for n, _ in hf_calls) == sorted(["AutoTokenizer", causal, causal, classifier])
    for name, kwargs in hf_calls:
        assert kwargs.get("trust_remote_code", "absent") is trust, (name, kwargs)
    assert RunConfig().model.trust_remote_code is False  # off unless the config says true


def _from_pretrained_calls():
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            f = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(f, ast.Attribute) and f.attr == "from_pretrained":
                if not (isinstance(f.value, ast.Name) and f.value.id == "PeftModel"):  # an adapter: no code
                    yield path, node


def test_trust_remote_code_is_never_switched_on_in_code():
    """Every `trust_remote_code` value in raydpo/ is the config's (`<x>.trust_remote_code`) or False."""
    values = []
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                values.append((path, node.value))
            if isinstance(node, ast.Dict):
                values += [(path, v) for k, v in zip(node.keys, node.values)
                           if isinstance(k, ast.Constant) and k.value == "trust_remote_code"]  # fmt: skip
    assert values
    for path, v in values:
        ok = (isinstance(v, ast.Attribute) and v.attr == "trust_remote_code") or (
            isinstance(v, ast.Constant) and v.value is False
        )
        assert ok, f"{where(path, v)}: trust_remote_code={ast.unparse(v)}"


def test_every_hf_loader_states_trust_remote_code():
    missing = [where(path, call) for path, call in _from_pretrained_calls()
               if not any(k.arg == "trust_remote_code" or k.arg is None for k in call.keywords)]  # fmt: skip
    assert not missing, "from_pretrained without trust_remote_code: " + ", ".join(missing)


def test_weights_load_without_unpickling():
    """safetensors, or `torch.load(..., weights_only=True)`; no pickle-family module anywhere in raydpo/."""
    pickle_modules = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "_pickle"}
    bad = []
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [where(path, node) for a in node.names if a.name.split(".")[0] in pickle_modules]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in pickle_modules or (
                    node.module == "torch" and any(a.name == "load" for a in node.names)
                ):
                    bad.append(where(path, node))
            elif isinstance(node, ast.Call):
                f, kw = node.func, {k.arg: k.value for k in node.keywords}
                name = ast.unparse(f)
                if name == "torch.load":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        bad.append(f"{where(path, node)}: torch.load without weights_only=True")
                if isinstance(f, ast.Attribute) and f.attr == "read_pickle":
                    bad.append(where(path, node))
                for arg, unsafe in (("allow_pickle", True), ("safe_serialization", False)):
                    v = kw.get(arg)
                    if isinstance(v, ast.Constant) and v.value is unsafe:
                        bad.append(f"{where(path, node)}: {arg}={unsafe}")
    assert not bad, bad


UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader",
               "UnsafeLoader", "FullLoader"}  # fmt: skip


def test_yaml_is_only_safe_loaded():
    bad = []
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and ast.unparse(node.value) == "yaml"
                and node.attr in UNSAFE_YAML
            ):
                bad.append(f"{where(path, node)}: yaml.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module == "yaml":
                bad += [f"{where(path, node)}: from yaml import {a.name}" for a in node.names
                        if not a.name.startswith(("safe_", "YAMLError"))]  # fmt: skip
            elif isinstance(node, ast.keyword) and node.arg == "Loader":
                bad.append(f"{where(path, node.value)}: Loader=")
    assert not bad, bad
    assert any("yaml.safe_load" in p.read_text() for p in SOURCES)  # the check looks at real YAML reading


# ----------------------------------------------------------------------------- names that become paths

ESCAPES = ["../x", "../../x", "a/../../x", "..", "..\\x"]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_name_cannot_escape(tmp_path, monkeypatch, capsys, name):
    from raydpo.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", f"run_name={name}", f"train.output_dir={tmp_path / 'runs'}"]) == 2
    assert "run_name" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def _sweep_file(tmp_path: Path, name: str) -> Path:
    f = tmp_path / "work" / "sweep.yaml"
    f.parent.mkdir()
    f.write_text(yaml.safe_dump({"name": name, "base": {"train": {"max_steps": 1, "output_dir": "out"}},
                                 "search": {"loss.beta": {"grid": [0.1]}}}))  # fmt: skip
    return f


@pytest.mark.parametrize("name", ESCAPES)
def test_sweep_name_cannot_escape(tmp_path, monkeypatch, capsys, name):
    """Refused today, through the base config's run_name (the sweep name is the base's run_name)."""
    from raydpo.cli import main

    f = _sweep_file(tmp_path, name)
    monkeypatch.chdir(f.parent)
    assert main(["sweep", str(f)]) == 2
    assert "name" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sweep.yaml", "work"]  # nothing written anywhere


def test_sweep_name_is_refused_by_the_sweep_file_check(tmp_path):
    from raydpo.errors import ConfigError
    from raydpo.sweep.run import load_sweep

    with pytest.raises(ConfigError, match="name"):
        load_sweep(_sweep_file(tmp_path, "../x"))


@pytest.mark.parametrize("name", ["../x", "a/../../x", ".."])
def test_eval_name_cannot_escape(tmp_path, name):
    from raydpo.errors import ConfigError
    from raydpo.evaluate.run import load_eval_config

    f = tmp_path / "eval.yaml"
    spec = {"name": name, "prompts": "p.jsonl", "reference": "ref", "policies": {"a": "ref"}}
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="name"):
        load_eval_config(f)


def test_redaction_survives_another_thread_changing_the_environment():
    """MLflow's telemetry sets environment variables from a thread of its own; reading os.environ while
    it does raised KeyError inside a sweep trial. The snapshot retries a torn read."""
    import os
    import threading

    from raydpo.redact import env_secrets

    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            os.environ[f"_RAYDPO_CHURN_{i % 50}"] = "v"
            os.environ.pop(f"_RAYDPO_CHURN_{(i + 25) % 50}", None)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(20000):
            env_secrets()
    finally:
        stop.set()
        t.join()
        for i in range(50):
            os.environ.pop(f"_RAYDPO_CHURN_{i}", None)


def test_the_suites_ray_uses_its_own_token_file_not_the_users_home():
    """Ray 2.60 writes ~/.ray/auth_token when a local Ray starts without a token; conftest.py gives the
    suite a token file of its own, which Ray's loader finds first."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path
    from ray._raylet import AuthenticationTokenLoader

    path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert path.is_file() and Path.home() not in path.parents
    assert path != _get_default_token_path()
    assert AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)

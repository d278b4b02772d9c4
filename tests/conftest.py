"""Shared fixtures: tiny random-init models and tokenizers saved to temp dirs (no network)."""

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = str(Path(__file__).parent)
# Ray worker processes import tests/faults.py (their setup hook); they inherit this environment.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
sys.path.insert(0, TESTS)


def _session_dir(prefix: str) -> Path:
    """A temp folder for this test session's shared files, removed when the session's process ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


if "RAYDPO_TEST_FAULTS" not in os.environ:
    os.environ["RAYDPO_TEST_FAULTS"] = str(_session_dir("raydpo-faults-") / "fault.json")

# Ray 2.60 starts a local Ray with token authentication and, when it finds no token, writes a new one
# to ~/.ray/auth_token. The suite's Ray instances (and the processes they start) read a token file of
# their own instead, so no test writes the user's ~/.ray.
if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    _token = _session_dir("raydpo-test-token-") / "auth_token"
    _token.write_text(os.urandom(16).hex())
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only (see cli.py)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (random init) with a Llama-style tokenizer (BOS added, EOS </s>)."""
    from raydpo.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), style="llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from raydpo.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), style="gpt2", arch="gpt2", seed=0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Builtin models are materialized under a per-session temp cache, not the user's home."""
    monkeypatch.setenv("RAYDPO_CACHE", str(tmp_path_factory.getbasetemp() / "raydpo-cache"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance on 127.0.0.1 shared by every Ray test (more CPU slots than cores:
    two train workers, the data actors and the controller fit on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        from raydpo.engine.session import local_ray_env, ray_below_training

        local_ray_env()  # what start_ray sets for a local Ray, and its processes' scheduling policy
        with ray_below_training():
            ray.init(
                address="local",
                num_cpus=4,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                logging_level="WARNING",
                runtime_env={"worker_process_setup_hook": "faults.install"},
            )
    from raydpo.engine.session import quiet_ray, stop_ray

    quiet_ray()
    yield ray
    stop_ray()  # and what this Ray started that outlived its shutdown, nothing else


@pytest.fixture
def inject_fault():
    """inject_fault(at_step, marker): the first Ray Train worker to finish step `at_step` raises once
    (tests/faults.py); the spec is removed after the test."""
    path = Path(os.environ["RAYDPO_TEST_FAULTS"])

    def arm(at_step: int | None = None, marker=None, **spec) -> None:
        path.write_text(json.dumps({"at_step": at_step, "marker": str(marker), **spec}))

    yield arm
    path.unlink(missing_ok=True)


def deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def run_cfg(tmp_path, tiny_llama_dir):
    """Build a small RunConfig for Ray runs: tiny Llama, builtin pairs, SQLite MLflow in tmp_path."""
    from raydpo.config import build_config

    def make(**over):
        base = {
            "run_name": "r",
            "model": {"policy": str(tiny_llama_dir)},
            "data": {"source": "builtin:tiny-prefs", "max_length": 48, "max_prompt_length": 24},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 4, "max_steps": 4, "log_every": 1, "output_dir": str(tmp_path / "runs")},
            "scaling": {"num_workers": 2},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"},
        }
        return build_config(deep_update(base, over))

    return make

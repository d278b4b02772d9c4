"""cluster/: every file parses, and the fields that matter hold (no Ray, no network, no Docker).

- the image: cluster/Dockerfile builds on the official Ray image of the Ray that pyproject.toml pins (and
  that is installed here), in a CPU and a GPU variant, and installs raydpo; every spec names an image
  tagged with raydpo's version and that Ray version;
- GPU: KubeRay worker groups and `ray up` node types request GPUs, with autoscaling bounds, and can hold
  a trial of the GPU sweep (sweeps/gpu-qwen-ultrafeedback.yaml);
- entrypoints and documented commands name a real raydpo command and an existing sweep or config file
  (the RayJob's sweep loads and validates with its overrides);
- security: token authentication on every node, the token from a Secret or a file, never a literal;
  no dashboard on a public address without it. The checks are also run on broken copies, to show
  they fail.
Plus the one-line errors of `raydpo cluster` that need no cluster.
"""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

import raydpo
from raydpo.cli import build_parser, main

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
PINNED = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
IMAGE = re.compile(rf"^[\w.\-/:]+/raydpo:{re.escape(raydpo.__version__)}-ray{re.escape(PINNED)}-(cpu|gpu)$")
INSTRUCTIONS = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "ADD", "RUN", "USER", "CMD", "ENTRYPOINT", "LABEL",
                "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}  # fmt: skip
SECRETISH = re.compile(r"token|password|passwd|secret|api_?key|access_?key", re.I)


def specs() -> dict[str, list[dict]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(CLUSTER.glob("*.yaml"))
    }


def dockerfile(path: Path = CLUSTER / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    return out


def arg_defaults(instructions) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)


def test_every_file_in_cluster_is_checked_and_parses():
    kinds = {".yaml": "YAML", ".md": "Markdown"}
    for p in sorted(CLUSTER.iterdir()):
        if p.suffix == ".yaml":
            assert [d for d in yaml.safe_load_all(p.read_text()) if d], f"{p} holds no document"
        elif p.name == "Dockerfile":
            assert {w for w, _ in dockerfile(p)} <= INSTRUCTIONS
        elif p.name == "Dockerfile.dockerignore":
            assert all(line.strip() for line in p.read_text().splitlines() if not line.startswith("#"))
        else:
            assert p.suffix in kinds, f"{p}: a file type this test does not check; add a check"
    assert "cluster/README.md" in (ROOT / "README.md").read_text()  # linked from the main README


def test_image_is_the_official_ray_image_of_the_pinned_ray():
    import ray

    assert ray.__version__ == PINNED, "the installed Ray is not the one pyproject.toml pins"
    ins = dockerfile()
    args = arg_defaults(ins)
    assert args["RAY_VERSION"] == PINNED and args["VARIANT"] in ("cpu", "gpu")
    assert [rest for word, rest in ins if word == "FROM"] == [
        "rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}"
    ]
    assert re.fullmatch(r"py3\d+", args["PYTHON"])
    run = " ".join(rest for word, rest in ins if word == "RUN")
    # CPU variant: torch's CPU wheel index; GPU variant (on Ray's CUDA image): the CUDA build from PyPI
    assert '"$VARIANT" = "cpu"' in run and "download.pytorch.org/whl/cpu" in run and "else" in run
    assert "pip install --no-cache-dir ." in run and "ray.__version__ == '${RAY_VERSION}'" in run
    workdir = next(rest for word, rest in ins if word == "WORKDIR")
    copied = {
        src for word, rest in ins if word == "COPY" for src in rest.split()[:-1] if not src.startswith("--")
    }
    assert {"raydpo", "sweeps", "configs", "pyproject.toml"} <= copied and workdir == "/home/ray/raydpo"
    assert all(rest.split()[-1].startswith(workdir) for word, rest in ins if word == "COPY")
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text()
    assert all(f"!{c}" in ignore for c in copied)  # the build context holds what is copied
    assert not [rest for word, rest in ins if word == "ENV" and SECRETISH.search(rest)]


def images(node, found=None) -> list[str]:
    found = [] if found is None else found
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                found.append(v)
            images(v, found)
    elif isinstance(node, list):
        for v in node:
            images(v, found)
    return found


def test_every_spec_runs_the_raydpo_image_of_the_pinned_ray():
    for name, docs in specs().items():
        found = images(docs)
        assert found, f"{name} names no image"
        for image in found:
            assert IMAGE.match(image), (
                f"{name}: image {image} is not raydpo:{raydpo.__version__}-ray{PINNED}-cpu|gpu"
            )
        for cluster in kuberay_clusters(docs):
            assert cluster["rayVersion"] == PINNED, name


def kuberay_clusters(docs) -> list[dict]:
    return [d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
            for d in docs if d.get("kind") in ("RayCluster", "RayJob")]  # fmt: skip


def gpu_sweep_trial() -> dict:
    return yaml.safe_load((ROOT / "sweeps" / "gpu-qwen-ultrafeedback.yaml").read_text())["trial"]


def test_gpu_workers_with_autoscaling_bounds_that_fit_the_gpu_sweep():
    trial = gpu_sweep_trial()
    need_cpus, need_gpus = trial["cpus_per_worker"], trial["num_workers"]
    all_specs = specs()
    kinds = set()
    for name, docs in all_specs.items():
        for cluster in kuberay_clusters(docs):
            kinds.add("kuberay")
            gpu = [g for g in cluster["workerGroupSpecs"] if _k8s_gpus(g) >= 1]
            assert gpu, f"{name}: no worker group requests nvidia.com/gpu"
            for g in gpu:
                assert (
                    g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= need_gpus
                ), name
                assert float(g["rayStartParams"]["num-cpus"]) >= need_cpus, (
                    f"{name}: a sweep worker needs {need_cpus} CPUs"
                )
            assert cluster["enableInTreeAutoscaling"] is True, name
        for doc in docs:
            if "available_node_types" in doc:  # a `ray up` config
                kinds.add(doc["provider"]["type"])
                gpu = {
                    n: t
                    for n, t in doc["available_node_types"].items()
                    if t.get("resources", {}).get("GPU", 0) >= 1
                }
                assert gpu, f"{name}: no node type with GPUs"
                for t in gpu.values():
                    assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] >= need_gpus, name
                    assert t["resources"]["CPU"] >= need_cpus, name
    assert {"kuberay", "aws", "gcp"} <= kinds


def _k8s_gpus(group: dict) -> float:
    return sum(float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in group["template"]["spec"]["containers"])  # fmt: skip


def test_ray_up_configs_pass_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    for docs in specs().values():
        for doc in docs:
            if "available_node_types" in doc:
                validate_config(prepare_config(copy.deepcopy(doc)))  # raises on a field Ray does not know


def commands(text: str) -> list[list[str]]:
    """Every `python -m raydpo ...` command in a file, its comments included (continuation lines joined)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [shlex.split(m) for m in re.findall(r"python -m raydpo [^\n]*", joined)]


def test_entrypoints_and_documented_commands_name_real_commands_and_files():
    from raydpo.sweep.run import load_sweep

    verbs = next(a for a in build_parser()._actions if a.dest == "command").choices
    workdir = next(rest for word, rest in dockerfile() if word == "WORKDIR") + "/"
    seen = 0
    readme = "\n".join(re.findall(r"```\w*\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S))
    texts = {p.name: p.read_text() for p in sorted(CLUSTER.glob("*.yaml"))} | {"README.md": readme}
    for name, text in texts.items():
        for cmd in commands(text):
            seen += 1
            verb, target = cmd[3], cmd[4]
            assert verb in verbs, f"{name}: raydpo has no command {verb!r}"
            if verb in ("train", "sweep", "eval"):
                path = ROOT / target.removeprefix(workdir)
                assert path.is_file(), f"{name}: {target} is no file of this repository (nor of the image)"
    for name, docs in specs().items():
        for doc in docs:
            if doc.get("kind") == "RayJob":
                cmd = shlex.split(doc["spec"]["entrypoint"])
                assert cmd[:4] == ["python", "-m", "raydpo", "sweep"], name
                load_sweep(
                    ROOT / cmd[4].removeprefix(workdir), cmd[5:]
                )  # the sweep and its overrides validate
    assert seen >= 5


# ----------------------------------------------------------------------------- security


def security_problems(name: str, docs: list[dict], text: str) -> list[str]:
    """What is wrong with one spec: literal secrets, nodes without token auth, a dashboard on a public
    address without it."""
    bad = []

    def walk(node, path=""):
        if isinstance(node, dict):
            if {"name", "value"} <= node.keys() and SECRETISH.search(str(node["name"])):
                bad.append(f"{path}: {node['name']} has a literal value (use valueFrom / a Secret)")
            for k, v in node.items():
                literal = isinstance(v, int) or (
                    isinstance(v, str) and not v.startswith(("/", "~"))
                )  # not a path
                if SECRETISH.search(str(k)) and not k.lower().endswith("name") and literal:
                    bad.append(f"{path}.{k}: a literal")
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(docs)
    for doc in docs:
        if doc.get("kind") == "Secret":
            bad.append("a Secret with its data in the file")
    if re.search(r"\b[0-9a-f]{32,}\b|AKIA[0-9A-Z]{16}|RAY_AUTH_TOKEN=(?!\$)", text):
        bad.append("a token-like literal")
    for cluster in kuberay_clusters(docs):
        if cluster.get("authOptions", {}).get("mode") != "token":
            bad.append("KubeRay cluster without authOptions.mode=token")
        head = cluster["headGroupSpec"]
        host = head.get("rayStartParams", {}).get("dashboard-host", "127.0.0.1")
        if host not in ("127.0.0.1", "localhost") and head.get("serviceType", "ClusterIP") != "ClusterIP":
            bad.append(f"dashboard on {host} behind a {head['serviceType']} Service")
    for doc in docs:
        if "available_node_types" in doc:
            starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in doc[k]
                      if "ray start" in c]  # fmt: skip
            if not starts or not all(
                "RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts
            ):
                bad.append("a `ray start` without RAY_AUTH_MODE=token and a token file")
            head = " ".join(doc["head_start_ray_commands"])
            if "--dashboard-host=127.0.0.1" not in head:
                bad.append("a `ray up` head whose dashboard is not on 127.0.0.1 (use `ray dashboard`)")
    return bad


def test_token_auth_everywhere_no_literal_secret_no_public_dashboard():
    for name, docs in specs().items():
        assert security_problems(name, docs, (CLUSTER / name).read_text()) == [], name
    text = (CLUSTER / "Dockerfile").read_text()
    assert not re.search(r"\b[0-9a-f]{32,}\b|AKIA[0-9A-Z]{16}|RAY_AUTH_TOKEN", text)


def test_the_security_check_catches_what_it_is_for():
    """Broken copies of the specs: each breakage is reported (so the test above can fail)."""
    s = specs()
    job = copy.deepcopy(s["kuberay-rayjob.yaml"])
    head = job[0]["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["env"] = [{"name": "RAY_AUTH_TOKEN", "value": "x" * 8}]
    head["serviceType"] = "LoadBalancer"
    del job[0]["spec"]["rayClusterSpec"]["authOptions"]
    problems = " | ".join(security_problems("job", job, ""))
    assert "literal value" in problems and "LoadBalancer" in problems and "authOptions" in problems
    up = copy.deepcopy(s["ray-up-aws.yaml"])
    up[0]["head_start_ray_commands"][-1] = "ray start --head --dashboard-host=0.0.0.0"
    problems = " | ".join(security_problems("up", up, "RAY_AUTH_TOKEN=" + "ab12" * 10))
    assert "token-like literal" in problems and "RAY_AUTH_MODE" in problems and "127.0.0.1" in problems


# ----------------------------------------------------------------------------- CLI errors, no cluster


@pytest.mark.parametrize(
    "argv, message",
    [
        (["status"], "no cluster in"),
        (["down"], "no cluster in"),
        (["up", "--workers", "-1"], "--workers must be >= 0"),
        (["up", "--cpus", "0"], "--cpus > 0"),
    ],
)
def test_cluster_command_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["cluster", *argv, "--dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydpo: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "c" / "cluster.json").exists()  # nothing was started

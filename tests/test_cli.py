"""The `raydpo` command end to end in subprocesses: exit codes, one-line errors, outputs."""

import json
import os
import subprocess
import sys

import pytest


def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "raydpo", *args], cwd=cwd, capture_output=True, text=True,
                          env=env)  # fmt: skip


@pytest.mark.parametrize(
    "override,needle",
    [
        ("loss.bta=0.1", "unknown key 'loss.bta'"),
        ("train.batch_size=big", "train.batch_size"),
        ("loss.name=dpo_sigmoid", "unknown loss 'dpo_sigmoid'"),
        ("model.policy=/no/such/model", "does not exist"),
        ("data.source=/no/such.jsonl", "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, override, needle):
    r = run("train", override, f"train.output_dir={tmp_path}", cwd=tmp_path)
    _one_line_exit_2(r, needle)
    assert "Traceback" not in r.stderr


def test_misspelt_key_in_yaml_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss:\n  nme: sigmoid\n")
    r = run("train", str(cfg), cwd=tmp_path)
    assert r.returncode == 2 and "unknown key 'loss.nme'" in r.stderr


GOOD = [{"prompt": f"Review {i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(10)]


@pytest.mark.ray
def test_train_keeps_good_rows_and_quarantines_broken_ones(tmp_path, ray_local):
    """The first command starts a local Ray of its own (the only test that trains through one, as a
    new user's `raydpo train` does); the second joins the tests' Ray (RAY_ADDRESS)."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    data = tmp_path / "mixed.jsonl"
    broken = [
        '{"prompt": "x", "chosen": "same", "rejected": "same"}',  # identical
        '{"prompt": "x", "chosen": 3, "rejected": "b"}',  # wrong_type
        '{"prompt": "x", "rejected": "b"}',  # missing_field
        "{not json",  # undecodable
    ]
    data.write_text("\n".join([json.dumps(r) for r in GOOD] + broken) + "\n")
    args = ["train", f"data.source={data}", "data.max_bad_fraction=0.5", "train.batch_size=5",
            "train.max_steps=2", f"train.output_dir={tmp_path}", "run_name=mixed", "data.max_length=32",
            "data.max_prompt_length=16"]  # fmt: skip
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "14 rows, 10 kept, 4 quarantined" in r.stdout
    q = [json.loads(line) for line in (tmp_path / "mixed" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(x["reason"] for x in q) == ["identical", "missing_field", "undecodable", "wrong_type"]
    assert sorted(x["row"] for x in q) == [10, 11, 12, 13]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed" / "final")  # the exported HF model
    assert model.config.num_hidden_layers == 2 and (tmp_path / "mixed" / "config.yaml").exists()
    stricter = [a.replace("run_name=mixed", "run_name=strict") for a in args[3:]]
    again = run(*args[:2], "data.max_bad_fraction=0.1", *stricter, cwd=tmp_path, env=env)
    assert again.returncode == 2 and "above data.max_bad_fraction=0.1" in again.stderr


def test_data_validate_prints_counts(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n" + '{"prompt": "x", "chosen": "", "rejected": "b"}\n')
    r = run("data", "validate", str(data), "max_bad_fraction=1.0", "--quarantine", str(tmp_path / "q.jsonl"),
            cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "2 rows, 1 kept, 1 quarantined" in r.stdout and "empty_text: 1" in r.stdout
    assert str(tmp_path / "q.jsonl") in r.stdout


def _one_line_exit_2(r, needle):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if "Token authentication" not in ln]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_unreachable_ray_address(tmp_path, tiny_llama_dir):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # the discard port: nothing listens
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "raydpo",
            "train",
            f"model.policy={tiny_llama_dir}",
            f"train.output_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    _one_line_exit_2(r, "RAY_ADDRESS=127.0.0.1:9: cannot connect")


def test_unreachable_mlflow_server(tmp_path, tiny_llama_dir):
    r = run("train", f"model.policy={tiny_llama_dir}", "tracking.tracking_uri=http://127.0.0.1:9",
            f"train.output_dir={tmp_path}", cwd=tmp_path)  # fmt: skip
    _one_line_exit_2(r, "MLflow tracking server http://127.0.0.1:9 is not reachable")


def test_conversational_data_needs_chat_template(tmp_path, tiny_llama_dir):
    data = tmp_path / "chat.jsonl"
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}  # fmt: skip
    data.write_text(json.dumps(row) + "\n")
    r = run("train", f"model.policy={tiny_llama_dir}", f"data.source={data}", f"train.output_dir={tmp_path}",
            cwd=tmp_path)  # fmt: skip
    _one_line_exit_2(r, "conversational")
    assert "has no chat template" in r.stderr


def test_demo_verb_takes_size_dir_seed_and_seeds(capsys):
    from raydpo.cli import _cmd_demo, build_parser, main

    args = build_parser().parse_args(["demo", "--size", "tiny", "--dir", "d", "--seed", "3", "--seeds", "2"])
    assert (args.size, args.dir, args.seed, args.seeds, args.func) == ("tiny", "d", 3, 2, _cmd_demo)
    default = build_parser().parse_args(["demo"])
    assert (default.size, default.seeds) == ("full", 1)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--seeds", "0"])
    assert e.value.code == 2 and "--seeds: expected a whole number ≥ 1, got '0'" in capsys.readouterr().err


def test_eval_without_policies_names_the_field(tmp_path, capsys):
    from raydpo.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("prompts: prompts.jsonl\nreference: ref\npolicies: {}\n")
    assert main(["eval", str(cfg)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("policies: needs at least one policy"), lines
    assert lines[0].startswith("raydpo: error: ") and str(cfg) in lines[0]


def test_eval_without_a_config_says_the_config_is_missing(capsys):
    from raydpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: raydpo eval")  # argparse's usage line, then the one error line
    assert err[1:] == ["raydpo eval: error: the following arguments are required: config"]


def test_sweep_without_a_sweep_file_says_the_sweep_file_is_missing(capsys):
    from raydpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sweep"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: raydpo sweep")  # argparse's usage line, then the one error line
    assert err[1:] == ["raydpo sweep: error: the following arguments are required: sweep_file"]


def test_missing_paths_are_found_before_ray_and_transformers_load(tmp_path):
    """`raydpo train` checks the paths a run names (engine.inputs) before it loads the engine."""
    from raydpo.config import build_config
    from raydpo.engine.inputs import check_paths
    from raydpo.errors import ConfigError, DataError

    good = tmp_path / "d.jsonl"
    good.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    check_paths(build_config({"model": {"policy": "builtin:tiny-llama"}, "data": {"source": str(good)}}))
    hub = {"model": {"policy": "owner/model"}, "data": {"source": "owner/set"}}  # checked later, by preflight
    check_paths(build_config(hub))
    missing = str(tmp_path / "no.jsonl")
    for data in ({"source": missing}, {"source": str(good), "eval_source": missing}):
        with pytest.raises(DataError, match="data source '.*no.jsonl' does not exist"):
            check_paths(build_config({"data": data}))
    with pytest.raises(ConfigError, match="model.reference: path './nope' does not exist"):
        check_paths(build_config({"model": {"reference": "./nope"}}))
    code = "import sys, raydpo.engine.inputs; print([m for m in ('ray', 'transformers') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_a_misspelt_key_is_reported_without_importing_torch_ray_or_transformers(tmp_path):
    """The CLI and the config parser import no heavy library until a config is validated (checking
    loss names needs the LOSSES registry, which imports torch): a typo is reported at once."""
    code = (
        "import sys; from raydpo.cli import main; rc = main(['train', 'loss.bta=0.1']); "
        "print(rc, [m for m in ('torch', 'ray', 'transformers') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == "2 []", r.stdout + r.stderr
    assert "unknown key 'loss.bta'" in r.stderr

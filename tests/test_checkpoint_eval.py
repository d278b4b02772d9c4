"""Evaluation along training (evaluate/checkpoints.py) and the eval file's seeds: the settings'
checks, which checkpoints are evaluated, and means over sampling seeds. The whole path runs in the
demo (tests/test_demo.py::test_every_run_is_evaluated_at_each_checkpoint_along_training)."""

import subprocess
import sys

import pytest
import torch
import yaml

from raydpo.config import build_config
from raydpo.engine.checkpointing import STATE_FILE, write_manifest
from raydpo.errors import ConfigError, UserError
from raydpo.evaluate.checkpoints import checkpoints_to_evaluate, prepare
from raydpo.evaluate.metrics import Interval
from raydpo.evaluate.run import load_eval_config, mean_over_seeds


def test_every_steps_sets_or_checks_the_checkpoint_interval():
    cfg = build_config({"eval": {"every_steps": 4, "config": "e.yaml"}})
    assert cfg.train.checkpoint_every == 4  # unset: checkpoint where the evaluation needs one
    assert build_config({"eval": {"every_steps": 4, "config": "e.yaml"}, "train": {"checkpoint_every": 2}})
    with pytest.raises(
        ConfigError, match=r"eval.every_steps \(5\) must be a multiple of train.checkpoint_every"
    ):
        build_config({"eval": {"every_steps": 5, "config": "e.yaml"}, "train": {"checkpoint_every": 2}})
    with pytest.raises(ConfigError, match="eval.every_steps needs eval.config"):
        build_config({"eval": {"every_steps": 5}})
    assert build_config({}).train.checkpoint_every is None  # off by default: nothing changes


def _eval_file(tmp_path, model_dir, **over):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the movie was"}\n')
    cfg = {"prompts": str(prompts), "reference": str(model_dir), "policies": {"sft": str(model_dir)},
           "baselines": ["sft"], **over}  # fmt: skip
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_eval_files_fail_before_training_with_one_line(tmp_path, tiny_llama_dir):
    run = lambda path: build_config({"eval": {"every_steps": 2, "config": str(path)}})  # noqa: E731
    with pytest.raises(ConfigError, match="eval.config: .* is not a file"):
        prepare(run(tmp_path / "missing.yaml"))
    bon = {"best_of_n": 4, "policy": str(tiny_llama_dir), "reward_model": str(tiny_llama_dir)}
    path = _eval_file(
        tmp_path, tiny_llama_dir, policies={"sft": str(tiny_llama_dir), "bon": bon}, baselines=["bon"]
    )
    with pytest.raises(UserError, match="baseline 'bon' is a Best-of-N policy"):
        prepare(run(path))
    ce = prepare(run(_eval_file(tmp_path, tiny_llama_dir)))
    assert ce.prompts == ["the movie was"] and set(ce.baselines) == {"sft"}
    assert prepare(build_config({})) is None


def test_eval_file_seeds_and_baseline_temperature_are_checked(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="baseline_temperature 0.5 is not one of the temperatures"):
        load_eval_config(
            _eval_file(tmp_path, tiny_llama_dir, temperatures=[0.0, 1.0], baseline_temperature=0.5)
        )
    with pytest.raises(ConfigError, match="seeds"):
        load_eval_config(_eval_file(tmp_path, tiny_llama_dir, seeds=0))
    cfg = load_eval_config(
        _eval_file(tmp_path, tiny_llama_dir, temperatures=[0.0, 1.0], baseline_temperature=1.0)
    )
    assert cfg.baseline_temperature == 1.0 and cfg.seeds == 1


def test_train_with_a_missing_eval_file_exits_2_before_ray_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raydpo", "train", "eval.every_steps=2",
                        f"eval.config={tmp_path / 'nope.yaml'}", f"train.output_dir={tmp_path}"],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "eval.config" in r.stderr and "nope.yaml" in r.stderr


def test_checkpoints_at_multiples_of_every_and_the_last_step(tmp_path):
    """Checkpoints at steps 2, 3, 4 and 5 of a 5-step run, every 2: steps 2, 4 and 5 (the last); an
    unfinished checkpoint (no manifest) at step 6 is skipped."""
    for i, step in enumerate((2, 3, 4, 5, 6)):
        d = tmp_path / f"checkpoint_2026-01-01_00-00-0{i}"
        d.mkdir()
        torch.save({"step": step}, d / STATE_FILE)
        if step != 6:
            write_manifest(d)
    assert [s for s, _ in checkpoints_to_evaluate(tmp_path, 2, 5)] == [2, 4, 5]


def test_mean_over_seeds_of_every_metric():
    """Win rates 0.6 and 0.8 over two seeds: mean 0.7, s = 0.1414, t_{0.975,1} = 12.706:
    0.7 ± 12.706 · s / √2 = 0.7 ± 1.2706."""
    iv = lambda x: Interval(x, x - 0.1, x + 0.1, 64)  # noqa: E731
    per_seed = [{"dpo": {1.0: {"winrate/vs_sft": iv(0.6), "kl": iv(2.0)}}},
                {"dpo": {1.0: {"winrate/vs_sft": iv(0.8), "kl": iv(2.0)}}}]  # fmt: skip
    out = mean_over_seeds(per_seed)["dpo"][1.0]
    assert out["winrate/vs_sft"].estimate == pytest.approx(0.7) and out["winrate/vs_sft"].n == 2
    assert out["winrate/vs_sft"].high - 0.7 == pytest.approx(1.2706, abs=1e-4)
    assert out["kl"] == (2.0, 2.0, 2.0, 2)

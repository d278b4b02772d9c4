"""Evaluation along training: sample and judge a run's checkpoints, as the DPO paper does (§6.1:
every run "evaluated every 100 training steps", so each run is a curve of (KL, reward) points).

A run config with `eval.every_steps: N` and `eval.config: EVAL_FILE` (the `raydpo eval` format)
checkpoints every N steps (config.py makes `train.checkpoint_every` divide N) and keeps every
checkpoint (engine/launch.py). After training, on the driver (or in the sweep trial's process),
each checkpoint at a multiple of N and the last one is sampled in this process
(`generate.sample_local`) on the eval file's prompts, at its first temperature, with its `n` and
its seed plus the run's `train.seed` (so each training seed is also evaluated on its own samples,
and a run with `train.seed: 0` on exactly the samples `raydpo eval` draws for its final model), and
measured as `raydpo eval` measures a policy: mean ground-truth reward, KL to the eval file's
reference, and the win rate against each of its baselines (judged by its judge; baselines sampled
the same way, at `baseline_temperature` when set). The training loop itself is not involved.

Each point goes to `<run_dir>/checkpoint_eval.json` (reused when the run is evaluated again with
the same eval settings; only new checkpoints are sampled; a baseline's samples are drawn once for
all runs with the same settings and seed) and to the run's MLflow run as
`checkpoint/kl`, `checkpoint/reward/gt_mean`, `checkpoint/winrate/vs_<baseline>` (each with
`_ci_low` and `_ci_high`) at step = the checkpoint's training step.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from raydpo.config import RunConfig
from raydpo.engine.checkpointing import STATE_FILE, CheckpointError, verify
from raydpo.engine.launch import resolve_paths
from raydpo.engine.storage import is_uri
from raydpo.errors import ConfigError, UserError
from raydpo.evaluate.generate import SampleJob, load_causal_lm, sample_local
from raydpo.evaluate.judges import make_judge
from raydpo.evaluate.metrics import Interval
from raydpo.evaluate.run import (
    BestOfNPolicy,
    EvalConfig,
    compare,
    load_eval_config,
    read_prompts,
    resolve_policy,
    summarize_policy,
)
from raydpo.methods import train
from raydpo.models.rewards import get_reward
from raydpo.tracking import RunLogger, tracking_uri

POINTS_FILE = "checkpoint_eval.json"
PREFIX = "checkpoint/"


class CheckpointEval(NamedTuple):
    """An eval file, checked and ready: what every checkpoint of a run is measured with."""

    cfg: EvalConfig
    path: str  # the eval file
    prompts: list[str]
    judge: object
    reward: object  # ground-truth reward function, or None
    reference: Path
    baselines: dict[str, Path]  # baseline name → model directory


def prepare(run_cfg: RunConfig) -> CheckpointEval | None:
    """Before training: the run's eval file loads, names model baselines, a usable judge, readable
    prompts (UserError naming the file otherwise). None when `eval.every_steps` is off."""
    if run_cfg.eval.every_steps is None:
        return None
    if is_uri(run_cfg.train.storage_path):
        raise UserError(f"eval.every_steps: checkpoints in remote storage (train.storage_path="
                        f"{run_cfg.train.storage_path}) are not evaluated along training; give a shared "
                        "folder there, or leave eval.every_steps unset")  # fmt: skip
    path = run_cfg.eval.config
    if not Path(path).is_file():
        raise ConfigError(f"eval.config: {path!r} is not a file (an eval file, the `raydpo eval` format)")
    cfg = load_eval_config(path)
    baselines = {}
    for b in cfg.baselines:
        spec = cfg.policies[b]
        if isinstance(spec, BestOfNPolicy):
            raise UserError(f"eval.config {path}: baseline {b!r} is a Best-of-N policy; checkpoints are "
                            "compared with model directories only")  # fmt: skip
        baselines[b] = resolve_policy(spec)
    judge = make_judge(cfg.judge)
    judge.check()
    reward = get_reward(cfg.reward) if cfg.reward else None
    return CheckpointEval(
        cfg, path, read_prompts(cfg), judge, reward, resolve_policy(cfg.reference), baselines
    )


def checkpoints_to_evaluate(run_dir: Path, every: int, total: int) -> list[tuple[int, Path]]:
    """(step, directory) of the intact checkpoints at multiples of `every` and at step `total`, by step."""
    found: dict[int, Path] = {}
    for d in sorted(Path(run_dir).glob("checkpoint_*")):
        if not d.is_dir() or d.suffix in (".tmp", ".old"):
            continue
        try:
            verify(d)
        except CheckpointError:
            continue
        step = int(torch.load(d / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)["step"])
        if step % every == 0 or step == total:
            found[step] = d  # the newest of equal steps (names sort by time)
    return sorted(found.items())


def _settings(ce: CheckpointEval, seed: int) -> dict:
    """What the points depend on besides the checkpoints: a changed eval file means new points."""
    digest = hashlib.sha256(json.dumps(ce.cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return {"eval_config": digest[:16], "seed": seed, "temperature": ce.cfg.temperatures[0]}


def _write(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: runs may write at once
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def baseline_rows(ce: CheckpointEval, path: Path, seed: int, ref) -> list[dict]:
    """A baseline's samples, drawn once per (eval settings, baseline, seed) and kept under the eval
    file's output folder (`<output_dir>/<name>/baseline-samples/`) for every run evaluated with it."""
    t_b = ce.cfg.temperatures[0] if ce.cfg.baseline_temperature is None else ce.cfg.baseline_temperature
    key = {**_settings(ce, seed), "baseline": str(path), "baseline_temperature": t_b}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(ce.cfg.output_dir).resolve() / ce.cfg.name / "baseline-samples" / f"{digest}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = sample_local(SampleJob(str(path), ce.cfg.n, seed), ce.prompts, reference=ref, temperatures=[t_b],
                        max_new_tokens=ce.cfg.max_new_tokens)  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write(cache, rows)  # two runs writing at once write the same samples; the rename is atomic
    return rows


def measure(ce: CheckpointEval, job: SampleJob, ref, base_rows: dict[str, list[dict]]) -> dict[str, Interval]:
    """`raydpo eval`'s numbers for one policy: reward, KL, win rate against each baseline."""
    t = ce.cfg.temperatures[0]
    t_b = t if ce.cfg.baseline_temperature is None else ce.cfg.baseline_temperature
    kw = dict(reference=ref, temperatures=[t], max_new_tokens=ce.cfg.max_new_tokens)
    rows = sample_local(job, ce.prompts, **kw)
    out = summarize_policy(rows, t, ce.reward)
    for b, b_rows in base_rows.items():
        out[f"winrate/vs_{b}"] = compare(ce.judge, rows, b_rows, t, t_b)[0]
    return out


def evaluate_run(run_cfg: RunConfig, ce: CheckpointEval, result: dict, log=print) -> list[dict]:
    """Sample and judge the checkpoints of a trained run (`result` of `methods.train`); returns one
    point per evaluated checkpoint, by step: {"step", "kl", "reward/gt_mean", "winrate/vs_<b>"}, each
    value (estimate, low, high, n)."""
    run_dir = Path(result["run_dir"])  # its points file and final/ (a checkpoint's tokenizer)
    checkpoints = Path(resolve_paths(run_cfg, log=lambda *_: None).run_location)  # a local folder (prepare)
    seed = ce.cfg.seed + run_cfg.train.seed
    settings = _settings(ce, seed)
    store = run_dir / POINTS_FILE
    old = json.loads(store.read_text()) if store.is_file() else {}
    points = {p["step"]: p for p in old.get("points", [])} if old.get("settings") == settings else {}
    found = checkpoints_to_evaluate(checkpoints, run_cfg.eval.every_steps, result["total_steps"])
    todo = [(s, d) for s, d in found if s not in points]
    if todo:
        log(f"evaluating {len(todo)} checkpoint(s) of {run_dir.name} with {ce.path} "
            f"({len(ce.prompts)} prompts × {ce.cfg.n}, temperature {settings['temperature']:g})")  # fmt: skip
        ref = load_causal_lm(str(ce.reference))
        base_rows = {b: baseline_rows(ce, p, seed, ref) for b, p in ce.baselines.items()}
        tokenizer = str(run_dir / "final")  # a checkpoint's model/ has no tokenizer; the exported model has
        logger = _logger(run_cfg, result, log)
        for step, d in todo:
            m = measure(ce, SampleJob(str(d / "model"), ce.cfg.n, seed, tokenizer), ref, base_rows)
            points[step] = {"step": step, **{k: list(iv) for k, iv in m.items()}}
            _write(store, {"settings": settings, "points": [points[s] for s in sorted(points)]})
            if logger:
                _log(logger, step, m, log)
    return [points[s] for s in sorted(points)]


def _logger(run_cfg: RunConfig, result: dict, log) -> RunLogger | None:
    if not (run_cfg.tracking.enabled and result.get("mlflow_run_id")):
        return None
    uri = tracking_uri(resolve_paths(run_cfg, log=lambda *_: None).tracking)
    return RunLogger(uri, result["mlflow_run_id"])


def _log(logger: RunLogger, step: int, m: dict[str, Interval], log) -> None:
    metrics = {}
    for k, iv in m.items():
        metrics.update(
            {f"{PREFIX}{k}": iv.estimate, f"{PREFIX}{k}_ci_low": iv.low, f"{PREFIX}{k}_ci_high": iv.high}
        )
    try:
        logger.log_metrics(metrics, step)
    except Exception as e:  # a store that is down costs the MLflow record, not the points on disk
        log(f"raydpo: MLflow did not take the checkpoint metrics of step {step} ({type(e).__name__}); "
            f"they are in {POINTS_FILE}")  # fmt: skip


def train_and_evaluate(cfg: RunConfig, log=print, **kwargs) -> dict:
    """`methods.train`, then, with `eval.every_steps`, the evaluation of the run's checkpoints (the
    eval file is checked before training starts). Adds "checkpoint_points" to the result."""
    ce = prepare(cfg)
    out = train(cfg, log, **kwargs)
    if ce is not None:
        out["checkpoint_points"] = evaluate_run(cfg, ce, out, log)
    return out

"""A whole training run: config → data → tokenized pairs → training → exported model.

`run_local` trains in this process (the single-process loop of `train.loop`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from raydpo.config import RunConfig, dump_config
from raydpo.data.schema import BadRow, PreferenceRecord
from raydpo.data.tokenize import TokenizedPair, pad_token_id, tokenize_pair
from raydpo.errors import DataError


def prepare_pairs(cfg: RunConfig, tokenizer, log=print) -> list[TokenizedPair]:
    """Read, validate (quarantining bad rows) and tokenize the training data."""
    from raydpo.data.validate import chat_renderer, validate_source

    render = chat_renderer(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    qpath = Path(cfg.data.quarantine_path or cfg.run_dir / "quarantine.jsonl")
    records, report = validate_source(cfg.data, qpath, render_chat=render)
    log(report.summary())
    pairs, bad = tokenize_records(records, tokenizer, cfg)
    if bad:
        write_tokenize_quarantine(bad, qpath.with_name(qpath.stem + ".tokenize.jsonl"), cfg.data.source)
        log(f"{len(bad)} pairs quarantined at tokenization (see {qpath.stem}.tokenize.jsonl)")
    if not pairs:
        raise DataError(f"{cfg.data.source}: no usable pairs after validation and tokenization")
    return pairs


def tokenize_records(records: list[PreferenceRecord], tokenizer, cfg: RunConfig):
    pairs, bad = [], []
    for i, rec in enumerate(records):
        try:
            pairs.append(tokenize_pair(rec, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length))
        except BadRow as e:
            bad.append((i, rec, e))
    return pairs, bad


def write_tokenize_quarantine(bad, path: Path, source: str) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for i, rec, err in bad:
            line = {"source": source, "row": rec.id or i, "reason": err.reason, "detail": err.detail}
            f.write(json.dumps({**line, "raw": rec.to_dict()}) + "\n")
    os.replace(tmp, path)


def save_model_atomically(model, tokenizer, target: Path) -> Path:
    """save_pretrained into a temp dir next to `target`, then rename: never half a model on disk."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def progress_printer(total: int, every: int, stream=sys.stderr):
    """A callback printing `step s/total loss acc pairs/s ETA` lines."""
    start = time.monotonic()

    def show(step: int, m: dict) -> None:
        elapsed = time.monotonic() - start
        eta = elapsed / step * (total - step)
        print(
            f"step {step}/{total}  loss {m['loss']:.4f}  acc {m['rewards/accuracies']:.2f}  "
            f"margin {m['rewards/margins']:.3f}  lr {m['learning_rate']:.2e}  ETA {eta:.0f}s",
            file=stream, flush=True,
        )  # fmt: skip

    return show


def run_local(cfg: RunConfig, log=print) -> dict:
    """Train in this process and export the final policy to <run_dir>/final. Returns a summary."""
    from raydpo.modeling import load_policy, load_reference, load_tokenizer
    from raydpo.train.loop import seed_everything, total_steps, train_local
    from raydpo.train.step import needs_reference

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    pairs = prepare_pairs(cfg, tokenizer, log)
    seed_everything(cfg.train.seed)
    policy = load_policy(cfg.model)
    reference = load_reference(cfg.model) if needs_reference(cfg.loss) else None
    steps = total_steps(cfg, len(pairs))
    log(f"training {cfg.run_name}: {len(pairs)} pairs, {steps} steps, loss {'+'.join(cfg.loss.names)}")
    history = train_local(cfg, pairs, policy, reference, pad_token_id(tokenizer), progress_printer(steps, 1))
    final = save_model_atomically(policy, tokenizer, run_dir / "final")
    log(f"final model: {final}")
    return {"run_dir": str(run_dir), "final_model": str(final), "history": history}

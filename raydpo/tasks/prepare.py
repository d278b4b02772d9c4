"""`raydpo task sentiment prepare DIR`: build the controlled-sentiment task, offline, cached in DIR.

Steps (all reused when DIR already holds a task of the same size, settings and seed):
  1. corpus.jsonl       review-like texts of mixed sentiment (tasks.sentiment.make_corpus)
  2. init_model/        a tokenizer trained on the corpus + a random-init small Llama
  3. runs/sft/final     the SFT policy: raydpo's SFT trainer (a Ray Train job) on the corpus
  4. prompts.jsonl,     neutral review openings (train / eval)
     eval_prompts.jsonl
  5. pairs.jsonl        per prompt, K samples from the SFT policy, scored by VADER and paired by
                        Bradley–Terry sampling (standard preference rows `raydpo train` reads)
  6. task.json          the manifest: paths, sizes, and reward statistics of corpus and SFT samples
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from raydpo.config import build_config
from raydpo.methods import train
from raydpo.models.generation import generate
from raydpo.models.tiny import build_model, build_tokenizer
from raydpo.tasks.sentiment import SentimentReward, corpus_stats, label_pairs, make_corpus, make_prompts

SIZES = {
    # corpus texts, model (hidden, layers, heads), vocab, SFT epochs, prompts, samples per prompt
    "tiny": {
        "corpus": 3000,
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "vocab": 600,
        "epochs": 2,
        "prompts": 96,
        "k": 4,
    },
    "full": {
        "corpus": 20000,
        "hidden": 128,
        "layers": 4,
        "heads": 4,
        "vocab": 1500,
        "epochs": 2,
        "prompts": 768,
        "k": 8,
    },  # fmt: skip
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _sft_config(root: Path, size: dict, seed: int, tracking: dict):
    return build_config({
        "run_name": "sft", "method": "sft",
        "model": {"policy": str(root / "init_model")},
        "data": {"source": str(root / "corpus.jsonl"), "max_length": 48, "max_prompt_length": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 10, "schedule": "cosine"},
        "train": {"batch_size": 32, "epochs": size["epochs"], "seed": seed, "output_dir": str(root / "runs"),
                  "log_every": 10, "checkpoint_every": 100},
        "scaling": {"cpus_per_worker": 1},  # one thread: the same SFT policy on any machine
        "tracking": tracking,
    })  # fmt: skip


def sample_and_pair(model_dir: Path, prompts: list[str], k: int, seed: int, temperature: float = 1.0):
    """K samples per prompt from a policy, VADER rewards, Bradley–Terry pairs, and sample statistics."""
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    completions = generate(model, tok, prompts, n=k, max_new_tokens=24, temperature=temperature, seed=seed)
    reward = SentimentReward()
    rewards = [reward(c) for c in completions]
    flat = [r for rs in rewards for r in rs]
    mean = sum(flat) / len(flat)
    std = (sum((r - mean) ** 2 for r in flat) / len(flat)) ** 0.5
    return label_pairs(prompts, completions, rewards, seed=seed), {"mean": mean, "std": std, "n": len(flat)}


def prepare(
    root: str | os.PathLike, size: str = "tiny", seed: int = 0, tracking: dict | None = None, log=print
) -> dict:
    """Build (or reuse) the task in `root`; returns the manifest."""
    root, spec = Path(root).resolve(), SIZES[size]
    manifest_path = root / "task.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("size") == size and manifest.get("seed") == seed and manifest.get("spec") == spec:
            log(f"task sentiment ({size}) already prepared in {root}")
            return manifest
    root.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(spec["corpus"], seed)
    _write_jsonl(root / "corpus.jsonl", [{"text": t} for t in corpus])
    stats = corpus_stats(corpus, SentimentReward())
    log(f"corpus: {len(corpus)} texts, VADER mean {stats['mean']:.3f} ± {stats['std']:.3f}")
    tok = build_tokenizer("llama", corpus=corpus, vocab_size=spec["vocab"])
    model = build_model(tok, hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"], seed=seed)
    tok.save_pretrained(root / "init_model")
    model.save_pretrained(root / "init_model")
    log(
        f"SFT policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        "training on the corpus"
    )
    sft = train(_sft_config(root, spec, seed, tracking or {}), log=log)
    prompts = make_prompts(spec["prompts"], seed)
    eval_prompts = make_prompts(max(64, spec["prompts"] // 4), seed + 1)
    _write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
    _write_jsonl(root / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
    pairs, sample_stats = sample_and_pair(Path(sft["final_model"]), prompts, spec["k"], seed)
    _write_jsonl(root / "pairs.jsonl", pairs)
    log(f"SFT samples: VADER mean {sample_stats['mean']:.3f} ± {sample_stats['std']:.3f}; {len(pairs)} pairs")
    manifest = {
        "task": "sentiment", "size": size, "seed": seed, "spec": spec, "root": str(root),
        "sft_model": sft["final_model"],
        "corpus": str(root / "corpus.jsonl"), "prompts": str(root / "prompts.jsonl"),
        "eval_prompts": str(root / "eval_prompts.jsonl"), "pairs": str(root / "pairs.jsonl"),
        "corpus_reward": stats, "sft_reward": sample_stats, "sft_mlflow_run_id": sft["mlflow_run_id"],
    }  # fmt: skip
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest

"""`raydpo bench`: DPO training throughput of raydpo's own path against TRL's DPOTrainer.

One run of this module, on one machine, side by side:

1. Preference pairs in two shapes, from a fixed seed (`make_pairs`): "long" (prompts of 96–160 words,
   responses of 16–40) and "short" (prompts of 8–24 words, responses of 48–96). Words are made-up
   syllable words, so the text has no meaning; only its lengths matter here.
2. ONE random-init model (`--model tiny`: Llama-style, 4 layers, hidden 256; `--model 0.5b`: Qwen2.5-0.5B's
   transformer body), on a ~4k byte-level BPE vocabulary trained on the generated text with
   `models.tiny.build_tokenizer`, saved to a temp dir; every run starts from it. `--device cuda` runs
   both engines on the GPU (bf16 autocast and SDPA by default, `--precision`), MFU against a bf16
   matmul peak measured in the same run, and GPU memory from torch's allocator.
3. A warm-up (one 2-step run of raydpo and of TRL, not reported; `--quick`: one Ray start and the
   TRL imports only, to fill the page cache), then rounds that alternate the engines (ABBA order
   across rounds): (a) raydpo — `raydpo.methods.train` on a `RunConfig`, the code
   `raydpo train` runs (local Ray, started and shut down per call as a command would; tracking off);
   (b) TRL's DPOTrainer in a subprocess of its own, with and without `precompute_ref_log_probs`;
   and, as a diagnostic outside the ratios, raydpo's loop in this process without Ray (`raydpo-noray`).
   All: same batch size, steps, learning rate, β, sigmoid loss, AdamW, clipping 1.0, data in file order
   (shuffle off / sequential sampler), so step 1 sees the same first pairs from the same weights.
4. Measured per call: steady-state pairs/s and tokens/s (warm-up steps skipped; raydpo from its per-step
   history, TRL from a TrainerCallback timing each step), the same from step-end timestamps
   (`*_interval`: everything between two steps included), wall time of the whole call, time to first
   step, peak RSS (sampled every 0.2 s with psutil: raydpo's Ray Train worker processes, and Ray's own
   processes apart; TRL's process), step-1 loss and logps/chosen; per shape the medians over rounds, the
   ratios raydpo/TRL (against the faster TRL variant by wall time), and model FLOP/s against a float32
   matmul peak measured in the same run.

Nothing here changes how raydpo trains: the phase timings (Ray start, data, fit, export) come from
timers wrapped around `engine.launch`'s own functions for the duration of a call.
TRL is optional: without it the benchmark measures raydpo alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from raydpo.config import ScalingConfig
from raydpo.errors import UserError

SCHEMA = "raydpo-bench/1"
SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "long": {"prompt_words": (96, 160), "response_words": (16, 40)},
    "short": {"prompt_words": (8, 24), "response_words": (48, 96)},
}
# `--model`: the bench's random-init models, on its own ~4k tokenizer. "0.5b": Qwen2.5-0.5B's transformer
# body (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, tied embeddings), so the same matmul work
# per token (~358M parameters in matmuls); its 151,936-token vocabulary would add 136M in the embedding
# and LM head, which a 4k vocabulary leaves out.
MODELS = {
    "tiny": {"arch": "llama", "layers": 4, "hidden": 256, "heads": 4, "vocab_size": 4096},
    "0.5b": {"arch": "qwen2", "layers": 24, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864,
             "tie": True, "vocab_size": 4096},
}  # fmt: skip
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
TOKENIZER_CORPUS_PAIRS = 256  # pairs per shape the tokenizer is trained on (fixed: one model for any --shape)
MAX_LENGTH = 512  # the tiny model's positions; every generated pair fits (checked), so nothing is truncated
MAX_PROMPT_LENGTH = 448
STEP1_TOLERANCE = 1e-4
RSS_INTERVAL_S = 0.2
TRL_VARIANTS = {"trl": False, "trl+precompute": True}  # name → precompute_ref_log_probs
# raydpo's settings in the bench unless `--set` gives the key: its fastest exact setting, as the bench
# also takes TRL's faster variant. Prefix sharing is off by default in `raydpo train` only because its
# log-probs differ from two separate passes in float32 rounding (within 1e-5, tests/test_prefix_sharing.py).
# Four accumulation micro-batches of 2 make the same update as one batch of 8 (gradients summed, the
# loss averaged) with a quarter of the activations: about 190 MB less peak memory than one pass, 95 MB
# less than two micro-batches of 4. They cost no step time since the reference scores each batch in one
# pass ahead of them and each is cut from the batch's pairs sorted by width (README "Throughput").
RAYDPO_DEFAULTS = ("train.prefix_sharing=true", "train.grad_accum_steps=4", "train.precompute_reference=true")
# On a GPU the reference stays in the step: the scoring stage's GPU path (engine/reference.py: the
# driver's GPU or one per actor) has not yet run on a GPU, and the bench's own process would keep the
# CUDA context of a scoring done in the driver while TRL's runs use the same GPU. `--set
# train.precompute_reference=true` asks for it.
GPU_RAYDPO_DEFAULTS = (*RAYDPO_DEFAULTS[:2], "train.precompute_reference=false")
NO_RAY = "raydpo-noray"  # diagnostic: raydpo's loop in this process without Ray (not in the ratios)
ENGINES = ("raydpo", NO_RAY, *TRL_VARIANTS)


@dataclass
class Settings:
    shapes: list[str]
    steps: int
    pairs: int
    batch_size: int = 8
    warmup_steps: int = 4
    rounds: int = 2
    quick: bool = False
    seed: int = 0
    lr: float = 1e-4
    beta: float = 0.1
    loss: str = "sigmoid"
    optimizer: str = "adamw (betas 0.9/0.999, eps 1e-8, weight decay 0), constant lr, clip 1.0"
    raydpo_overrides: list[str] = field(default_factory=list)  # RAYDPO_DEFAULTS and `--set`: raydpo's only
    extra: dict = field(default_factory=dict)
    model: str = "tiny"  # MODELS
    device: str = "cpu"  # cpu, or cuda: one GPU for raydpo's one worker and for TRL's process
    precision: str = "fp32"  # bf16: autocast in both (raydpo's scaling.precision, TRL's bf16), fp32 weights
    attn_implementation: str | None = None  # both engines' attention (None: transformers' default)


class BenchError(UserError):
    """A bad benchmark argument (the CLI prints it as one line, exit status 2)."""


def resolve_settings(
    quick: bool = False,
    shape: str | None = None,
    pairs: int | None = None,
    steps: int | None = None,
    batch_size: int = 8,
    rounds: int | None = None,
    seed: int = 0,
    overrides: list[str] | tuple = (),
    model: str = "tiny",
    device: str = "cpu",
    precision: str | None = None,
) -> Settings:
    """Defaults: 24 steps of 8 pairs (192 pairs), both shapes, 2 rounds, the first 4 steps not counted.
    `quick`: 8 steps, the short shape, 1 round, 2 steps not counted. `device` auto: cuda where torch
    sees a GPU; on cuda the default precision is bf16 with SDPA attention, on cpu fp32."""
    if model not in MODELS:
        raise BenchError(f"--model {model!r}: allowed {', '.join(MODELS)}")
    if device not in DEVICES:
        raise BenchError(f"--device {device!r}: allowed {', '.join(DEVICES)}")
    if precision is not None and precision not in PRECISIONS:
        raise BenchError(f"--precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    if device != "cpu":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = precision or ("bf16" if device == "cuda" else "fp32")
    shape = shape or ("short" if quick else "both")
    if shape not in (*SHAPES, "both"):
        raise BenchError(f"--shape {shape!r}: allowed long, short, both")
    steps = steps if steps is not None else (8 if quick else 24)
    rounds = rounds if rounds is not None else (1 if quick else 2)
    if steps < 1 or batch_size < 1 or rounds < 1:
        raise BenchError("--steps, --batch-size and --rounds must be at least 1")
    pairs = pairs if pairs is not None else steps * batch_size
    if pairs < batch_size or pairs % batch_size:
        raise BenchError(f"--pairs {pairs}: must be a positive multiple of the batch size ({batch_size})")
    warmup = min(2 if quick else 4, steps // 2)
    for text in overrides:
        if not text.split("=", 1)[0].startswith("train."):
            raise BenchError(f"--set {text}: only train.* settings apply (e.g. train.prefix_sharing=true)")
    given = {text.split("=", 1)[0] for text in overrides}
    defaults = GPU_RAYDPO_DEFAULTS if device == "cuda" else RAYDPO_DEFAULTS
    overrides = [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)
    if overrides:
        from raydpo.config import build_config

        build_config({}, "bench --set", list(overrides))  # a bad key or value: ConfigError, exit 2
    return Settings(
        shapes=list(SHAPES) if shape == "both" else [shape],
        steps=steps,
        pairs=pairs,
        batch_size=batch_size,
        warmup_steps=warmup,
        rounds=rounds,
        quick=quick,
        seed=seed,
        raydpo_overrides=list(overrides),
        model=model,
        device=device,
        precision=precision,
        attn_implementation="sdpa" if device == "cuda" else None,
    )


# ------------------------------------------------------------------------------------------ data


def vocabulary(seed: int = 0, size: int = 3000) -> list[str]:
    """`size` distinct made-up words of 1–3 consonant-vowel syllables, sorted (a function of the seed)."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        n = rng.choice((1, 2, 2, 3))
        words.add("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(n)))
    return sorted(words)


def make_pairs(shape: str, n: int, seed: int = 0) -> list[dict]:
    """`n` preference pairs of `shape` ({prompt, chosen, rejected}); responses start with a space.
    A function of (shape, seed): the first k pairs of any n ≥ k are the same."""
    spec = SHAPES[shape]
    words = vocabulary(seed)
    rng = random.Random(f"raydpo-bench/{shape}/{seed}")

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choices(words, k=rng.randint(*lo_hi)))

    pairs = []
    for _ in range(n):
        prompt, chosen = text(spec["prompt_words"]), " " + text(spec["response_words"])
        rejected = chosen
        while rejected == chosen:
            rejected = " " + text(spec["response_words"])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def word_counts(pair: dict) -> tuple[int, int, int]:
    return tuple(len(pair[k].split()) for k in ("prompt", "chosen", "rejected"))


# ------------------------------------------------------------------------------------ arithmetic


def steady_state(step_seconds: list[float], step_tokens: list[float], batch: int, warmup: int) -> dict:
    """Pairs/s and tokens/s over the steps after the first `warmup`: total work / total time; and pairs/s
    of the median step (`pairs_per_s_median_step`), which one stalled step on a busy machine does not move."""
    s, t = step_seconds[warmup:], step_tokens[warmup:]
    if not s or sum(s) <= 0:
        return {"steps": 0, "pairs_per_s": None, "tokens_per_s": None, "step_s_median": None,
                "pairs_per_s_median_step": None}  # fmt: skip
    total, median = sum(s), statistics.median(s)
    return {
        "steps": len(s),
        "pairs_per_s": batch * len(s) / total,
        "tokens_per_s": sum(t) / total,
        "step_s_median": median,
        "pairs_per_s_median_step": fraction(batch, median),
    }


def interval_rate(step_end_s: list[float], step_tokens: list[float], batch: int, warmup: int) -> dict:
    """The same from step-end timestamps: the time between the end of step `warmup` and of the last
    step, so whatever happens between steps (logging, reporting, data) counts too."""
    if warmup < 1 or len(step_end_s) <= warmup:
        return {"pairs_per_s": None, "tokens_per_s": None}
    span = step_end_s[-1] - step_end_s[warmup - 1]
    n = len(step_end_s) - warmup
    if span <= 0:
        return {"pairs_per_s": None, "tokens_per_s": None}
    return {"pairs_per_s": batch * n / span, "tokens_per_s": sum(step_tokens[warmup:]) / span}


def flops_per_token(params: int, reference_forward: bool = True) -> float:
    """≈ 6·N per trained token (forward + backward of the policy) plus 2·N when the step also runs the
    reference model's forward (attention's sequence-squared terms left out)."""
    return (6 + (2 if reference_forward else 0)) * params


def model_flops_per_s(
    params: int, tokens_per_s: float | None, reference_forward: bool = True
) -> float | None:
    return None if tokens_per_s is None else flops_per_token(params, reference_forward) * tokens_per_s


def fraction(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


RATIO_KEYS = (
    "pairs_per_s",
    "pairs_per_s_median_step",
    "tokens_per_s",
    "pairs_per_s_interval",
    "wall_s",
    "first_step_s",
    "peak_rss_train_mb",
    "peak_gpu_train_mb",
)


def ratios(ours: dict, theirs: dict) -> dict:
    """raydpo / TRL for each measure (above 1: raydpo higher, i.e. faster for rates, slower for times)."""
    return {k: fraction(ours.get(k), theirs.get(k)) for k in RATIO_KEYS}


def agree(a: float | None, b: float | None, tol: float, relative: bool = False) -> bool | None:
    if a is None or b is None:
        return None
    return abs(a - b) <= tol * (max(1.0, abs(a), abs(b)) if relative else 1.0)


def median_of(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------------------ memory sampling


class RssSampler:
    """Sums the RSS of a process tree per class every `interval` s in a thread; keeps each class's peak.
    `classify(cmdline) -> class name or None` (None: not counted)."""

    def __init__(self, root_pid: int, classify, include_root: bool, interval: float = RSS_INTERVAL_S):
        self.root_pid, self.classify, self.include_root, self.interval = (
            root_pid,
            classify,
            include_root,
            interval,
        )
        self.peaks: dict[str, int] = {}
        self.names: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = ([root] if self.include_root else []) + root.children(recursive=True)
        except psutil.Error:
            return
        totals: dict[str, int] = {}
        for p in procs:
            try:
                argv = p.cmdline()
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            cls = self.classify(" ".join(argv))
            if cls is None:
                continue
            totals[cls] = totals.get(cls, 0) + rss
            self.names.setdefault(cls, set()).add(process_label(argv))
        for cls, v in totals.items():
            self.peaks[cls] = max(self.peaks.get(cls, 0), v)

    def peaks_mb(self) -> dict[str, float]:
        return {k: v / 2**20 for k, v in self.peaks.items()}


def process_label(argv: list[str]) -> str:
    if not argv:
        return "?"
    first = argv[0].split()[0] if argv[0].startswith("ray::") else os.path.basename(argv[0])
    if first.startswith("python") and len(argv) > 1:
        rest = [a for a in argv[1:] if not a.startswith("-")]
        first += " " + (os.path.basename(rest[0]) if rest else argv[1])
    return first[:60]


def classify_ray(cmdline: str) -> str:
    """raydpo's training processes are Ray Train's worker actors; everything else Ray started is Ray's."""
    return "train" if "RayTrainWorker" in cmdline else "ray_other"


# ----------------------------------------------------------------------------------- the model


def build_bench_model(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Tokenizer (trained on both shapes' text) + the random-init model `MODELS[size]`, saved to `root`;
    returns its facts."""
    from raydpo.models.tiny import build_model, build_tokenizer

    spec = MODELS[size]

    corpus = [
        p[k]
        for s in SHAPES
        for p in make_pairs(s, TOKENIZER_CORPUS_PAIRS, seed)
        for k in ("prompt", "chosen", "rejected")
    ]
    tok = build_tokenizer("llama", corpus=corpus, vocab_size=spec["vocab_size"])
    shape = {k: v for k, v in spec.items() if k not in ("arch", "vocab_size")}
    model = build_model(tok, arch=spec["arch"], seed=seed, **shape)
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(root)
    model.save_pretrained(root)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return {
        "path": str(root),
        "name": size,
        **spec,
        "vocab_size": len(tok),
        "params": total,
        "matmul_params": total - embed,
    }


def pair_token_counts(pairs: list[dict], tokenizer) -> list[int]:
    """Tokens one pair puts through the model: (prompt + chosen) + (prompt + rejected), EOS included,
    as `data.tokenize.tokenize_pair` lays them out."""
    from raydpo.data.schema import PreferenceRecord
    from raydpo.data.tokenize import tokenize_pair

    out = []
    for p in pairs:
        t = tokenize_pair(PreferenceRecord(**p), tokenizer, 10**6, 10**6 - 1)
        out.append(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids))
        longest = len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
        if longest > MAX_LENGTH or len(t.prompt_ids) > MAX_PROMPT_LENGTH:
            raise RuntimeError(
                f"a generated pair has {longest} tokens, over {MAX_LENGTH}: it would be truncated"
            )
    return out


def matmul_peak(
    n: int = 2048, reps: int = 8, threads: int | None = None, device: str = "cpu", precision: str = "fp32"
) -> float:
    """Best `torch.mm` rate (FLOP/s) of `reps` n×n products in `precision` (float32 or bfloat16) on
    `device`, with `threads` threads on a CPU (a GPU's products are timed to its synchronization)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        torch.mm(a, b)
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------- raydpo runs


class StepClock(io.TextIOBase):
    """The `stream` raydpo's progress lines go to: keeps when the driver learned of each step's end."""

    def __init__(self):
        self.ends: dict[int, float] = {}

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        m = re.match(r"step (\d+)/", s)
        if m:
            self.ends.setdefault(int(m[1]), time.perf_counter())
        return len(s)


@contextlib.contextmanager
def phase_timers(module, names: tuple[str, ...], seconds: dict, starts: dict, t0: float):
    """Time calls of `module.<name>` (seconds spent, and when the first call began) while inside."""
    originals = {n: getattr(module, n) for n in names}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            starts.setdefault(name, t - t0)
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    for n, fn in originals.items():
        setattr(module, n, timed(n, fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)


PHASES = ("preflight", "start_ray", "build_datasets", "attach_reference", "fit", "export_final")


def raydpo_config(
    settings: Settings, model_dir: str, data_path: Path, out_dir: Path, run_name: str, steps: int
):
    from raydpo.config import build_config

    return build_config(
        {
            "run_name": run_name,
            "model": {"policy": model_dir, "attn_implementation": settings.attn_implementation},
            "data": {
                "source": str(data_path),
                "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT_LENGTH,
            },
            "loss": {"name": settings.loss, "beta": settings.beta},
            "optim": {"name": "adamw", "lr": settings.lr, "schedule": "constant", "max_grad_norm": 1.0},
            "train": {
                "batch_size": settings.batch_size,
                "max_steps": steps,
                "shuffle": False,
                "seed": settings.seed,
                "output_dir": str(out_dir),
            },
            "tracking": {"enabled": False, "tracking_uri": f"sqlite:///{out_dir / 'mlflow.db'}"},
            "scaling": {"use_gpu": settings.device == "cuda", "precision": settings.precision},
        },
        "bench",
        settings.raydpo_overrides,
    )


def run_raydpo(
    settings: Settings, model_dir: str, data_path: Path, out_dir: Path, run_name: str, steps: int
) -> dict:
    """One `raydpo.methods.train` call (what `raydpo train` runs), Ray started inside it and shut down
    after it, as a command would. Each call has an output directory of its own (`out_dir/run_name`),
    so with `train.precompute_reference` every call scores the reference itself (its cache lives
    there), as a first run would. Returns the measurements."""
    import ray

    from raydpo.engine import launch
    from raydpo.engine.session import stop_ray
    from raydpo.methods import train

    cfg = raydpo_config(settings, model_dir, data_path, out_dir / run_name, run_name, steps)
    cpus = worker_cpus(cfg)
    clock, seconds, starts, logs = StepClock(), {}, {}, []
    if ray.is_initialized():
        stop_ray()
    sampler = RssSampler(os.getpid(), classify_ray, include_root=False).start()
    t0 = time.perf_counter()
    try:
        with phase_timers(launch, PHASES, seconds, starts, t0):
            out = train(cfg, log=logs.append, stream=clock)
        wall = time.perf_counter() - t0
    finally:
        sampler.stop()
        stop_ray()  # and a finished run's Ray processes that outlive Ray's shutdown
    history = [h for h in out["history"] if "pairs_per_second" in h]
    step_seconds = [settings.batch_size / h["pairs_per_second"] for h in history]
    step_tokens = [h.get("tokens_per_second", 0.0) * s for h, s in zip(history, step_seconds)]
    ends = [clock.ends[k] - t0 for k in sorted(clock.ends)]
    first = history[0] if history else {}
    peaks = sampler.peaks_mb()
    gpu = [h["gpu_memory_peak_mb"] for h in out["history"] if "gpu_memory_peak_mb" in h]
    phases = {f"{k}_s": v for k, v in seconds.items()}
    if "fit" in starts and ends:
        phases["fit_to_first_step_s"] = ends[0] - starts["fit"]
        phases["steps_s"] = ends[-1] - ends[0]
        phases["fit_after_last_step_s"] = starts["fit"] + seconds["fit"] - ends[-1]  # checkpoint, teardown
    if "start_ray" in starts and ends:
        phases["ray_up_to_first_step_s"] = ends[0] - starts["start_ray"] - seconds["start_ray"]
    phases["other_s"] = wall - covered(starts, seconds)  # the data stage and scoring run during `fit`
    return {
        "engine": "raydpo",
        "wall_s": wall,
        "first_step_s": ends[0] if ends else None,
        "steps": len(history),
        "step_seconds": step_seconds,
        "step_tokens": step_tokens,
        "step_end_s": ends,
        "step1": {"loss": first.get("loss"), "logps/chosen": first.get("logps/chosen")},
        "peak_rss_mb": {"train": peaks.get("train"), "ray_other": peaks.get("ray_other")},
        "peak_gpu_mb": max(gpu) if gpu else None,  # rank 0's torch.cuda.max_memory_allocated
        "processes": {k: sorted(v) for k, v in sampler.names.items()},
        "phases_s": phases,
        "worker_cpus": cpus,
        "reference_forward_in_step": not cfg.train.precompute_reference,
    }


def tokens_per_step_note(res: dict) -> str:
    """Why raydpo's tokens per step differ from TRL's: with prefix sharing a pair's prompt is one
    sequence's, counted once (TRL runs it twice)."""
    eng = res["engines"]
    ours, theirs = (eng.get(e, {}).get("tokens_per_step") for e in ("raydpo", res["trl_variant"]))
    if ours is None or theirs is None:
        return "DIFFER"
    return (f"raydpo {ours:.0f} vs TRL {theirs:.0f} (raydpo counts a pair's prompt once where it shares "
            "it, train.prefix_sharing; TRL twice)")  # fmt: skip


def covered(starts: dict, seconds: dict) -> float:
    """Seconds inside at least one timed phase (phases may overlap)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted((starts[k], starts[k] + seconds[k]) for k in starts if k in seconds):
        total += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    return total


def worker_cpus(cfg) -> float:
    """CPUs (and torch threads) raydpo gives its worker for `cfg` on this machine (launch resolves it)."""
    from raydpo.engine import launch

    resolve = getattr(launch, "resolve_scaling", None)  # absent in raydpo before CPUs were shared out
    return float((resolve(cfg) if resolve else cfg).scaling.cpus_per_worker or 1)


def run_raydpo_noray(settings: Settings, model_dir: str, data_path: Path, out_dir: Path, steps: int) -> dict:
    """Diagnostic, not what `raydpo train` runs: raydpo's training loop (`engine.local.train_local`, the
    loop every Ray Train worker runs) in this process, without Ray, Ray Data, DDP or checkpoints, with as
    many torch threads as raydpo gives its Ray worker. Its steps against the Ray run's show what Ray adds
    per step. With `train.precompute_reference` the pairs are scored first by the same scorer as the
    Ray run's (`engine.reference.ScoreReference`, in this process) and the loop reads the values, as a Ray
    worker reads the cache. No RSS (it shares this process) and no step timestamps (the loop returns its
    history)."""
    import torch

    from raydpo.data.schema import PreferenceRecord
    from raydpo.data.tokenize import pad_token_id, tokenize_pair
    from raydpo.engine.local import train_local
    from raydpo.methods import get_method
    from raydpo.models.loading import load_tokenizer

    cfg = raydpo_config(settings, model_dir, data_path, out_dir, "noray", steps)
    cpus = worker_cpus(cfg)
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    try:
        t0 = time.perf_counter()
        tok = load_tokenizer(cfg.model)
        rows = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
        d = cfg.data
        pairs = [tokenize_pair(PreferenceRecord(**r), tok, d.max_length, d.max_prompt_length) for r in rows]
        ref = None
        if cfg.train.precompute_reference:
            from raydpo.engine.reference import ScoreReference

            ref = ScoreReference(cfg.model_dump(mode="json")).columns(pairs)  # the driver's batches
        history = train_local(cfg, get_method(cfg.method), pairs, pad_token_id(tok), reference_logps=ref)
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    step_seconds = [settings.batch_size / h["pairs_per_second"] for h in history]
    first = history[0] if history else {}
    return {
        "engine": NO_RAY,
        "wall_s": wall,
        "first_step_s": None,
        "steps": len(history),
        "step_seconds": step_seconds,
        "step_tokens": [h.get("tokens_per_second", 0.0) * s for h, s in zip(history, step_seconds)],
        "step_end_s": [],
        "step1": {"loss": first.get("loss"), "logps/chosen": first.get("logps/chosen")},
        "peak_rss_mb": {"train": None, "ray_other": None},
        "phases_s": {},
        "worker_cpus": cpus,
        "reference_forward_in_step": ref is None,
    }


# ------------------------------------------------------------------------------------- TRL runs


def trl_available() -> str | None:
    """TRL's version, or None (with the reason printed in one line) when `import trl` fails."""
    try:
        import trl
    except Exception as e:  # ImportError, or a broken install raising something else
        print(
            f"TRL not available ({type(e).__name__}: {str(e).splitlines()[0][:120]}); measuring raydpo alone"
        )
        return None
    return trl.__version__


def trl_args(spec: dict):
    """TRL's DPOConfig for this benchmark (`trl_settings`)."""
    from trl import DPOConfig

    return DPOConfig(**trl_settings(spec))


def trl_settings(spec: dict) -> dict:
    """DPOConfig's arguments: the settings raydpo uses, data in file order; on `spec["device"]` cuda the
    GPU, with bf16 autocast over float32 weights for `spec["precision"]` bf16 (TRL loads the model in
    float32 unless told otherwise), as raydpo's `scaling.precision=bf16` does."""
    return dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        beta=spec["beta"],
        loss_type=[spec["loss"]],
        seed=spec["seed"],
        use_cpu=spec.get("device", "cpu") == "cpu",
        save_strategy="no",
        optim="adamw_torch",
        weight_decay=0.0,
        bf16=spec.get("precision") == "bf16",  # autocast, float32 weights: as raydpo's scaling.precision
        fp16=False,
        model_init_kwargs={"attn_implementation": spec["attn_implementation"]}
        if spec.get("attn_implementation")
        else None,
        max_length=None,
        disable_dropout=True,
        train_sampling_strategy="sequential",
        dataloader_drop_last=True,
        precompute_ref_log_probs=spec["precompute"],
    )


def trl_child(spec_path: str) -> None:
    """Runs in its own process: one DPOTrainer construction + train + save_model; writes the timings."""
    t_start = time.perf_counter()
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    imports_s = time.perf_counter() - t_start
    spec = json.loads(Path(spec_path).read_text())
    step_seconds, ends, step1 = [], [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            step_seconds.append(now - self.begin)
            ends.append(now - t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and not step1:
                step1.update({"loss": logs["loss"], "logps/chosen": logs.get("logps/chosen")})

    t0 = time.perf_counter()
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = DPOTrainer(
        model=spec["model_dir"],
        args=trl_args(spec),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Clock()],
    )
    t_init = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter()
    trainer.save_model(str(Path(spec["output_dir"]) / "final"))  # raydpo's call also writes its final model
    wall = time.perf_counter() - t0
    ds = trainer.train_dataset
    per_pair = [
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
    ]
    b, n = spec["batch_size"], len(per_pair)
    step_tokens = [sum(per_pair[(k * b + i) % n] for i in range(b)) for k in range(len(step_seconds))]
    out = {
        "engine": spec["variant"],
        "wall_s": wall,
        "first_step_s": ends[0] if ends else None,
        "steps": len(step_seconds),
        "step_seconds": step_seconds,
        "step_tokens": step_tokens,
        "step_end_s": ends,
        "step1": step1,
        "imports_s": imports_s,
        "torch_threads": torch.get_num_threads(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "phases_s": {"init_s": t_init - t0, "train_s": t_train - t_init, "save_s": t0 + wall - t_train},
        "reference_forward_in_step": not spec["precompute"],
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    Path(spec["out"]).write_text(json.dumps(out))


def run_trl(
    settings: Settings, variant: str, model_dir: str, data_path: Path, out_dir: Path, steps: int
) -> dict:
    """TRL in a subprocess of its own (`python -m benchmarks.bench --trl-child SPEC`), RSS sampled."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "variant": variant,
        "precompute": TRL_VARIANTS[variant],
        "model_dir": model_dir,
        "data": str(data_path),
        "output_dir": str(out_dir),
        "out": str(out_dir / "result.json"),
        "steps": steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "beta": settings.beta,
        "loss": settings.loss,
        "seed": settings.seed,
        "device": settings.device,
        "precision": settings.precision,
        "attn_implementation": settings.attn_implementation,
    }
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        "HF_DATASETS_CACHE": str(out_dir / "hf-datasets"),  # no cached precompute from another run
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    log_path = out_dir / "trl.log"
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench", "--trl-child", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(out_dir),
        )
        sampler = RssSampler(proc.pid, lambda _cmd: "train", include_root=True).start()
        rc = proc.wait()
        sampler.stop()
    process_wall = time.perf_counter() - t
    if rc != 0 or not Path(spec["out"]).is_file():
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"TRL run ({variant}) failed with exit status {rc}:\n{tail}")
    out = json.loads(Path(spec["out"]).read_text())
    peaks = sampler.peaks_mb()
    out.update(process_wall_s=process_wall, peak_rss_mb={"train": peaks.get("train"), "ray_other": None})
    return out


# ------------------------------------------------------------------------------------ summaries


def add_rates(run: dict, settings: Settings) -> dict:
    b, w = settings.batch_size, settings.warmup_steps
    run["steady"] = steady_state(run["step_seconds"], run["step_tokens"], b, w)
    run["interval"] = interval_rate(run["step_end_s"], run["step_tokens"], b, w)
    return run


def summarize_engine(runs: list[dict], params: int, peak: float | None) -> dict:
    """Medians over rounds of one engine's runs (each with `steady` and `interval` added)."""
    ref = runs[0]["reference_forward_in_step"]
    tokens = median_of([r["steady"]["tokens_per_s"] for r in runs])
    flops = model_flops_per_s(params, tokens, ref)
    per_step = [statistics.mean(r["step_tokens"]) for r in runs if r["step_tokens"]]
    return {
        "rounds": len(runs),
        "pairs_per_s": median_of([r["steady"]["pairs_per_s"] for r in runs]),
        "tokens_per_s": tokens,
        "pairs_per_s_median_step": median_of([r["steady"]["pairs_per_s_median_step"] for r in runs]),
        "pairs_per_s_interval": median_of([r["interval"]["pairs_per_s"] for r in runs]),
        "tokens_per_s_interval": median_of([r["interval"]["tokens_per_s"] for r in runs]),
        "wall_s": median_of([r["wall_s"] for r in runs]),
        "first_step_s": median_of([r["first_step_s"] for r in runs]),
        "peak_rss_train_mb": median_of([r["peak_rss_mb"]["train"] for r in runs]),
        "peak_rss_ray_other_mb": median_of([r["peak_rss_mb"]["ray_other"] for r in runs]),
        "peak_gpu_train_mb": median_of([r.get("peak_gpu_mb") for r in runs]),
        "step1_loss": runs[0]["step1"].get("loss"),
        "step1_logps_chosen": runs[0]["step1"].get("logps/chosen"),
        "tokens_per_step": statistics.mean(per_step) if per_step else None,
        "reference_forward_in_step": ref,
        "model_flops_per_s": flops,
        "fraction_of_peak": fraction(flops, peak),
    }


def summarize_shape(runs: list[dict], params: int, peak: float | None) -> dict:
    """Per engine summaries, the faster TRL variant (by wall time), ratios and the step-1 check."""
    engines = {
        e: summarize_engine([r for r in runs if r["engine"] == e], params, peak)
        for e in ENGINES
        if any(r["engine"] == e for r in runs)
    }
    trl = [e for e in TRL_VARIANTS if e in engines]
    chosen = min(trl, key=lambda e: engines[e]["wall_s"] or float("inf")) if trl else None
    out = {"engines": engines, "trl_variant": chosen, "ratios": None, "step1": None}
    phases = [r["phases_s"] for r in runs if r["engine"] == "raydpo"]
    out["raydpo_phases_s"] = {k: median_of([p.get(k) for p in phases]) for k in (phases[0] if phases else {})}
    if "raydpo" in engines and NO_RAY in engines:
        ray_step = median_of([r["steady"]["step_s_median"] for r in runs if r["engine"] == "raydpo"])
        bare_step = median_of([r["steady"]["step_s_median"] for r in runs if r["engine"] == NO_RAY])
        out["ray_step_overhead"] = {
            "median_step_s_ray": ray_step,
            "median_step_s_noray": bare_step,
            "ratio": fraction(ray_step, bare_step),
        }
    if chosen and "raydpo" in engines:
        ours, theirs = engines["raydpo"], engines[chosen]
        out["ratios"] = ratios(ours, theirs)
        out["step1"] = {
            "loss_raydpo": ours["step1_loss"],
            "loss_trl": theirs["step1_loss"],
            "loss_agree": agree(ours["step1_loss"], theirs["step1_loss"], STEP1_TOLERANCE),
            "logps_chosen_raydpo": ours["step1_logps_chosen"],
            "logps_chosen_trl": theirs["step1_logps_chosen"],
            "logps_chosen_agree": agree(
                ours["step1_logps_chosen"], theirs["step1_logps_chosen"], STEP1_TOLERANCE, relative=True
            ),
            "tokens_per_step_agree": agree(ours["tokens_per_step"], theirs["tokens_per_step"], 0.5),
        }
    return out


REQUIRED = {
    "": {
        "schema": str,
        "created": str,
        "machine": dict,
        "settings": dict,
        "model": dict,
        "peak": dict,
        "results": dict,
        "notes": list,
        "total_s": (int, float),
    },
    "machine": {
        "cpu_count": int,
        "python": str,
        "torch": str,
        "ray": str,
        "trl": (str, type(None)),
        "transformers": str,
        "raydpo": str,
        "platform": str,
    },
    "settings": {
        "shapes": list,
        "steps": int,
        "pairs": int,
        "batch_size": int,
        "warmup_steps": int,
        "rounds": int,
        "quick": bool,
        "seed": int,
        "lr": (int, float),
        "beta": (int, float),
    },
    "model": {"params": int, "matmul_params": int, "layers": int, "hidden": int, "vocab_size": int},
    "peak": {"flops": (int, float), "flops_1_thread": (int, float), "threads": int},
    "shape": {
        "data": dict,
        "runs": list,
        "engines": dict,
        "trl_variant": (str, type(None)),
        "ratios": (dict, type(None)),
        "step1": (dict, type(None)),
        "raydpo_phases_s": dict,
    },
    "run": {
        "engine": str,
        "wall_s": (int, float),
        "first_step_s": (int, float, type(None)),
        "step_seconds": list,
        "step_tokens": list,
        "step_end_s": list,
        "step1": dict,
        "peak_rss_mb": dict,
        "steady": dict,
        "interval": dict,
    },
    "engine": {
        "pairs_per_s": (int, float, type(None)),
        "tokens_per_s": (int, float, type(None)),
        "wall_s": (int, float, type(None)),
        "first_step_s": (int, float, type(None)),
        "peak_rss_train_mb": (int, float, type(None)),
        "model_flops_per_s": (int, float, type(None)),
        "fraction_of_peak": (int, float, type(None)),
        "step1_loss": (int, float, type(None)),
    },
}


def schema_problems(result: dict) -> list[str]:
    """What in `result` (as written to JSON) does not match the schema; [] when it all does."""
    problems: list[str] = []

    def check(obj, kind: str, where: str) -> None:
        if not isinstance(obj, dict):
            problems.append(f"{where or 'result'}: not an object")
            return
        for key, types in REQUIRED[kind].items():
            if key not in obj:
                problems.append(f"{where}{'.' if where else ''}{key}: missing")
            elif isinstance(obj[key], bool) and bool not in (types if isinstance(types, tuple) else (types,)):
                problems.append(f"{where}.{key}: a boolean")
            elif not isinstance(obj[key], types):
                problems.append(f"{where}{'.' if where else ''}{key}: {type(obj[key]).__name__}")

    check(result, "", "")
    if problems:
        return problems
    if result["schema"] != SCHEMA:
        problems.append(f"schema: {result['schema']!r}, expected {SCHEMA!r}")
    for kind in ("machine", "settings", "model", "peak"):
        check(result[kind], kind, kind)
    for shape, res in result["results"].items():
        check(res, "shape", f"results.{shape}")
        if not isinstance(res, dict):
            continue
        for i, run in enumerate(res.get("runs", [])):
            check(run, "run", f"results.{shape}.runs[{i}]")
        for e, summary in res.get("engines", {}).items():
            check(summary, "engine", f"results.{shape}.engines.{e}")
    return problems


# ------------------------------------------------------------------------------------- printing


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def matmul_line(peak: dict, result: dict) -> str:
    """The measured matmul peak that '% peak' (model FLOP/s utilization, MFU) is against."""
    size, precision = peak.get("matmul_size", 2048), peak.get("precision", "fp32")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(precision, precision)
    where = peak.get("device", "cpu")
    head = f"{dtype} matmul (torch.mm {size}², best of 8) on {where}: "
    if where != "cpu":
        return head + f"{_num(fraction(peak['flops'], 1e12), '{:.1f}')} TFLOP/s; % peak is against it"
    return head + (
        f"{_num(fraction(peak.get('flops_all_threads'), 1e9))} GFLOP/s with {peak['threads']} threads, "
        f"{peak['flops_1_thread'] / 1e9:.1f} with 1; % peak is against the higher"
    )


def format_report(result: dict) -> str:
    from raydpo.reporting import format_table

    peak = result["peak"]
    cols = [
        "shape",
        "engine",
        "pairs/s",
        "pairs/s med",
        "pairs/s ivl",
        "tokens/s",
        "wall s",
        "1st step s",
        "RSS MB train",
        "RSS MB Ray",
        "GPU MB",
        "step-1 loss",
        "GFLOP/s",
        "% peak",
    ]
    rows, notes = [], []
    for shape, res in result["results"].items():
        for e, s in res["engines"].items():
            mark = "*" if e == res["trl_variant"] else " (diag.)" if e == NO_RAY else ""
            rows.append(
                [
                    shape,
                    e + mark,
                    _num(s["pairs_per_s"]),
                    _num(s["pairs_per_s_median_step"]),
                    _num(s["pairs_per_s_interval"]),
                    _num(s["tokens_per_s"], "{:.0f}"),
                    _num(s["wall_s"]),
                    _num(s["first_step_s"]),
                    _num(s["peak_rss_train_mb"], "{:.0f}"),
                    _num(s["peak_rss_ray_other_mb"], "{:.0f}"),
                    _num(s.get("peak_gpu_train_mb"), "{:.0f}"),
                    _num(s["step1_loss"], "{:.6f}"),
                    _num(fraction(s["model_flops_per_s"], 1e9)),
                    _num(fraction(s["fraction_of_peak"], 0.01)),
                ]
            )
        r, c = res["ratios"], res["step1"]
        if r:
            gpu = r.get("peak_gpu_train_mb")
            gpu_note = f", peak GPU memory {_ratio(gpu)}" if gpu else ""
            notes.append(
                f"{shape}: raydpo / TRL ({res['trl_variant']}): pairs/s {_ratio(r['pairs_per_s'])} "
                f"(median step {_ratio(r['pairs_per_s_median_step'])}), tokens/s "
                f"{_ratio(r['tokens_per_s'])}, pairs/s (interval) {_ratio(r['pairs_per_s_interval'])}, wall "
                f"{_ratio(r['wall_s'])}, time to first step {_ratio(r['first_step_s'])}, peak RSS "
                f"{_ratio(r['peak_rss_train_mb'])}" + gpu_note
            )
            notes.append(
                f"{shape}: step-1 loss raydpo {_num(c['loss_raydpo'], '{:.6f}')} vs TRL "
                f"{_num(c['loss_trl'], '{:.6f}')}: {'agree' if c['loss_agree'] else 'DIFFER'} within "
                f"{STEP1_TOLERANCE:g}; step-1 logps/chosen {_num(c['logps_chosen_raydpo'], '{:.4f}')} vs "
                f"{_num(c['logps_chosen_trl'], '{:.4f}')}: "
                f"{'agree' if c['logps_chosen_agree'] else 'DIFFER'}; tokens per step "
                + ("equal" if c["tokens_per_step_agree"] else tokens_per_step_note(res))
            )
        p = res["raydpo_phases_s"]
        if p:
            part = lambda k, label, p=p: f"{label} {p[k]:.1f}s" if p.get(k) is not None else None
            inner = [part("fit_to_first_step_s", "start to step 1"), part("steps_s", "later steps"),
                     part("fit_after_last_step_s", "after the last step")]  # fmt: skip
            fit = part("fit_s", "Ray Train fit")
            if fit and any(inner):
                fit += " (" + ", ".join(x for x in inner if x) + ")"
            outer = [part("preflight_s", "preflight"), part("start_ray_s", "Ray start"),
                     part("ray_up_to_first_step_s", "step 1 after Ray is up"), fit,
                     part("build_datasets_s", "Ray Data pipeline"),
                     part("attach_reference_s", "reference scoring (train.precompute_reference)"),
                     part("export_final_s", "export"),
                     part("other_s", "other")]  # fmt: skip
            shown = ", ".join(x for x in outer if x)
            notes.append(f"{shape}: raydpo call (median): {shown}; the data pipeline and the scoring run "
                         "in the driver while Ray Train starts")  # fmt: skip
        o = res.get("ray_step_overhead")
        if o and o["ratio"] is not None:
            notes.append(
                f"{shape}: raydpo's median step on its Ray Train worker {o['median_step_s_ray']:.2f}s, the "
                f"same loop without Ray ({NO_RAY}, same torch threads) {o['median_step_s_noray']:.2f}s: "
                f"{o['ratio']:.2f}x"
            )
    table = format_table(cols, rows)
    m, st = result["machine"], result["settings"]
    lines = [
        table,
        "",
        *notes,
        matmul_line(peak, result),
        f"model: {result['model'].get('name', 'tiny')}, {result['model']['params'] / 1e6:.1f}M parameters; "
        f"{st.get('device', 'cpu')}, {st.get('precision', 'fp32')}, attention "
        f"{st.get('attn_implementation') or 'default'}",
        f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, ray {m['ray']}, trl {m['trl'] or 'absent'}, "
        f"transformers {m['transformers']}; {result['settings']['steps']} steps x "
        f"{result['settings']['batch_size']}"
        f" pairs, first {result['settings']['warmup_steps']} steps not counted, medians of "
        f"{result['settings']['rounds']} round(s)",
    ]
    runs = [run for res in result["results"].values() for run in res["runs"]]
    cpus = sorted({run["worker_cpus"] for run in runs if run["engine"] == "raydpo" and "worker_cpus" in run})
    threads = sorted({run["torch_threads"] for run in runs if run.get("torch_threads")})
    if cpus or threads:
        lines.append(
            f"threads: raydpo's Ray Train worker {'/'.join(f'{c:g}' for c in cpus) or '?'} CPU(s) = torch "
            f"threads; TRL's process {'/'.join(map(str, threads)) or '?'} torch threads"
        )
    lines.append(f"raydpo settings: {' '.join(result['settings']['raydpo_overrides']) or 'the defaults'}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- orchestration


def machine_info(trl_version: str | None) -> dict:
    import ray
    import torch
    import transformers

    import raydpo

    return {
        "cpu_count": os.cpu_count() or 0,
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "trl": trl_version,
        "transformers": transformers.__version__,
        "raydpo": raydpo.__version__,
        "load_avg": list(os.getloadavg()),
    }


def warm_caches(with_trl: bool) -> dict:
    """The quick warm-up: one local Ray start and stop (raydpo's own `start_ray`), and a process that
    imports what the TRL runs import; the runs that follow then find their files in the page cache."""
    from raydpo.engine.session import start_ray, stop_ray

    t = time.perf_counter()
    try:
        start_ray(2)
    except Exception as e:  # Ray's start-up timeout on an overloaded machine, say: the runs will retry
        print(f"bench: warm-up Ray start failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    finally:
        stop_ray()
    out = {"ray_start_stop": time.perf_counter() - t}
    if with_trl:
        t = time.perf_counter()
        code = "import torch, transformers, datasets, trl.trainer.dpo_trainer"
        subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
        out["imports"] = time.perf_counter() - t
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


NOTES = [
    "pairs/s and tokens/s: steady state after the warm-up steps; raydpo's from its per-step history (the "
    "loop's "
    "own timing of a step: data, forward, backward, update), TRL's from on_step_begin to on_step_end. "
    "'interval' rates are from step-end timestamps (raydpo: when the driver received each step's progress "
    "line), so time between steps (reporting, logging) counts too.",
    "wall: the whole training call. raydpo: methods.train, i.e. preflight, Ray start, the Ray Data pipeline, "
    "the reference scoring (with train.precompute_reference, each call its own), Ray Train, the final "
    "checkpoint and export (imports done before). TRL: reading the data, tokenizer, "
    "DPOTrainer construction (model and reference load, tokenization, precompute), train(), save_model() "
    "(imports done before; they are in process_wall_s).",
    "TRL variant marked * is the one the ratios use: the faster by wall time. With precompute (TRL's "
    "precompute_ref_log_probs, raydpo's train.precompute_reference) the reference forward runs before the "
    "first step, so the steps do less work (FLOP/s counts 6N per token, not 8N).",
    "step-1 loss: both start from the same weights with policy == reference, so the sigmoid loss is ln 2 in "
    "both whatever the data; logps/chosen (same first 8 pairs, shuffle off in both) is the check that "
    "matters.",
    f"{NO_RAY} (diag.) is raydpo's training loop run in the benchmark's own process without Ray "
    "(engine.local.train_local: no Ray start, Ray Data, DDP, reports or checkpoints), with the Ray worker's "
    "torch threads: not what `raydpo train` runs, not in the ratios; it shows what Ray adds per step.",
    "peak RSS: sampled every 0.2 s; raydpo's 'train' is its Ray Train worker process(es), 'Ray' the other "
    "processes Ray started (gcs, raylet, dashboard agents, data and controller actors, idle workers); TRL's "
    "is its own process.",
]


def run_bench(
    quick: bool = False,
    shape: str | None = None,
    pairs: int | None = None,
    steps: int | None = None,
    out: str | None = None,
    rounds: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    keep: bool = False,
    overrides: list[str] | tuple = (),
    model: str = "tiny",
    device: str = "auto",
    precision: str | None = None,
    log=print,
) -> dict:
    """The whole benchmark; prints the table, writes the JSON, returns the result. The temporary work
    directory (model, data, run outputs) is removed at the end unless `keep`."""
    t_start = time.perf_counter()
    settings = resolve_settings(
        quick, shape, pairs, steps, batch_size, rounds, seed, overrides, model, device, precision
    )
    out_path = Path(out) if out else Path("runs") / "bench" / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    if os.environ.pop("RAY_ADDRESS", None):
        log("bench: RAY_ADDRESS ignored: the benchmark starts its own local Ray (to measure its workers)")
    trl_version = trl_available()
    workdir = Path(tempfile.mkdtemp(prefix="raydpo-bench-"))
    log(f"bench: work directory {workdir}{'' if keep else ' (removed at the end; --keep keeps it)'}")
    try:
        return _bench(settings, workdir, out_path, trl_version, t_start, keep, log)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(
    settings: Settings,
    workdir: Path,
    out_path: Path,
    trl_version: str | None,
    t_start: float,
    keep: bool,
    log,
) -> dict:
    import torch
    from transformers import AutoTokenizer

    model = build_bench_model(workdir / "model", settings.seed, settings.model)
    model_dir = model["path"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log(
        f"bench: model {settings.model} ({model['arch']}), {model['params'] / 1e6:.2f}M parameters "
        f"({model['matmul_params'] / 1e6:.2f}M in matmuls), vocabulary {model['vocab_size']}; "
        f"{settings.device}, {settings.precision}, attention {settings.attn_implementation or 'default'}"
    )
    gpu = settings.device == "cuda"
    size = 8192 if gpu else 2048
    every = matmul_peak(size, device=settings.device, precision=settings.precision)
    one_thread = every if gpu else matmul_peak(size, threads=1, precision=settings.precision)
    peak = {
        "flops": max(every, one_thread),  # on a busy machine all threads can lose to one
        "threads": torch.get_num_threads(),
        "flops_all_threads": every,
        "flops_1_thread": one_thread,
        "matmul_size": size,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "precision": settings.precision,
    }
    log(
        f"bench: {settings.precision} matmul {every / 1e9:.1f} GFLOP/s on {peak['device']}"
        + ("" if gpu else f" ({peak['threads']} threads), {one_thread / 1e9:.1f} GFLOP/s (1 thread)")
    )
    data, files = {}, {}
    for s in settings.shapes:
        rows = make_pairs(s, settings.pairs, settings.seed)
        tokens = pair_token_counts(rows, tokenizer)
        files[s] = write_jsonl(workdir / f"pairs-{s}.jsonl", rows)
        counts = [word_counts(r) for r in rows]
        data[s] = {
            **{k: list(v) for k, v in SHAPES[s].items()},
            "pairs": len(rows),
            "path": str(files[s]),
            "prompt_words_mean": statistics.mean(c[0] for c in counts),
            "response_words_mean": statistics.mean(x for c in counts for x in c[1:]),
            "tokens_per_pair_mean": statistics.mean(tokens),
            "tokens_per_pair_max": max(tokens),
        }
    # The no-Ray diagnostic runs in this process: on a GPU its CUDA context would stay here for the others.
    engines = ["raydpo", *(() if gpu else (NO_RAY,)), *(TRL_VARIANTS if trl_version else ())]
    settings.extra["raydpo_scaling"] = ScalingConfig().model_dump()  # raydpo's defaults: what it runs with

    def one(engine: str, s: str, tag: str, n_steps: int, data_path: Path) -> dict:
        if engine == "raydpo":
            return run_raydpo(settings, model_dir, data_path, workdir / "raydpo", f"{s}-{tag}", n_steps)
        if engine == NO_RAY:
            return run_raydpo_noray(settings, model_dir, data_path, workdir / "noray", n_steps)
        return run_trl(settings, engine, model_dir, data_path, workdir / f"{engine}-{s}-{tag}", n_steps)

    warm = {}
    first = settings.shapes[0]
    if settings.quick:  # caches only: Ray's first start, the libraries' files (a few seconds, not two runs)
        warm = warm_caches(bool(trl_version))
        log(f"bench: warm-up (Ray start, imports) {sum(warm.values()):.1f}s")
    else:  # one short run of raydpo and of TRL: imports, disk caches, Ray's first start
        warm_steps = min(2, settings.steps)
        warm_pairs = make_pairs(first, warm_steps * settings.batch_size, settings.seed)
        warm_data = write_jsonl(workdir / "warmup.jsonl", warm_pairs)
        for engine in engines[:2]:
            t = time.perf_counter()
            one(engine, first, "warmup", warm_steps, warm_data)
            warm[engine] = time.perf_counter() - t
            log(f"bench: warm-up {engine} ({warm_steps} steps) {warm[engine]:.1f}s")
    results = {}
    for s in settings.shapes:
        runs = []
        for r in range(settings.rounds):
            order = engines if r % 2 == 0 else engines[::-1]  # ABBA across rounds: drift falls on both
            for engine in order:
                load = os.getloadavg()[0]
                run = add_rates(one(engine, s, f"r{r}", settings.steps, files[s]), settings)
                run.update(round=r, load_1min=[load, os.getloadavg()[0]])
                runs.append(run)
                st = run["steady"]
                log(
                    f"bench: {s} round {r + 1}/{settings.rounds} {engine}: "
                    f"{_num(st['pairs_per_s'])} pairs/s, "
                    f"wall {run['wall_s']:.1f}s, first step {_num(run['first_step_s'])}s"
                )
        summary = summarize_shape(runs, model["matmul_params"], peak["flops"])
        results[s] = {"data": data[s], "runs": runs, **summary}
    notes = list(NOTES)
    if not trl_version:
        notes.append("TRL was not importable: raydpo measured alone, no ratios")
    loads = [x for res in results.values() for run in res["runs"] for x in run["load_1min"]]
    cpus = os.cpu_count() or 1
    if loads and max(loads) > cpus:
        notes.insert(
            0,
            f"BUSY MACHINE: the 1-minute load average reached {max(loads):.1f} on {cpus} CPUs "
            "during the runs; other processes took CPU time, so rates and times are slower and noisier "
            "than on an idle machine (a multi-threaded run suffers more than a 1-thread one)",
        )
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": machine_info(trl_version),
        "settings": asdict(settings),
        "model": model,
        "peak": peak,
        "warmup_s": warm,
        "results": results,
        "notes": notes,
        "workdir": str(workdir) if keep else None,
        "total_s": time.perf_counter() - t_start,
    }
    problems = schema_problems(json.loads(json.dumps(result)))
    if problems:
        raise RuntimeError(f"benchmark result does not match its schema: {problems[:5]}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log("")
    log(format_report(result))
    log(f"bench: {result['total_s']:.0f}s in all; JSON written to {out_path}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-child":
        trl_child(sys.argv[2])
    else:
        sys.exit(
            "usage: raydpo bench [--quick] [--shape long|short|both] [--pairs N] [--steps N] [--out FILE]"
        )

"""`raydpo bench` (benchmarks/bench.py) without running a benchmark: the pair generator, the rate, FLOP/s
and ratio arithmetic, the JSON schema of a result assembled from fake runs, and the CLI arguments."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` sits beside `raydpo`

from benchmarks import bench  # noqa: E402
from raydpo.cli import _cmd_bench, build_parser  # noqa: E402
from raydpo.errors import UserError  # noqa: E402

# ------------------------------------------------------------------------------------ pairs


@pytest.mark.parametrize("shape", ["long", "short"])
def test_pairs_have_the_shapes_word_counts(shape):
    spec = bench.SHAPES[shape]
    pairs = bench.make_pairs(shape, 200, seed=3)
    assert len(pairs) == 200
    for p in pairs:
        prompt, chosen, rejected = bench.word_counts(p)
        assert spec["prompt_words"][0] <= prompt <= spec["prompt_words"][1]
        assert spec["response_words"][0] <= chosen <= spec["response_words"][1]
        assert spec["response_words"][0] <= rejected <= spec["response_words"][1]
        assert p["chosen"] != p["rejected"]
        assert p["chosen"][0] == p["rejected"][0] == " "  # a token boundary after the prompt
        assert not p["prompt"].endswith(" ")
    # the whole range is used, not one corner of it
    prompts = [bench.word_counts(p)[0] for p in pairs]
    assert min(prompts) < sum(spec["prompt_words"]) / 2 < max(prompts)


def test_the_shapes_are_as_named():
    assert bench.SHAPES["long"] == {"prompt_words": (96, 160), "response_words": (16, 40)}
    assert bench.SHAPES["short"] == {"prompt_words": (8, 24), "response_words": (48, 96)}


def test_pairs_are_a_function_of_shape_and_seed():
    assert bench.make_pairs("long", 20, seed=0) == bench.make_pairs("long", 20, seed=0)
    assert bench.make_pairs("long", 20, seed=0) != bench.make_pairs("long", 20, seed=1)
    assert bench.make_pairs("short", 20, seed=0) != bench.make_pairs("long", 20, seed=0)
    assert bench.make_pairs("short", 50, seed=2)[:20] == bench.make_pairs("short", 20, seed=2)  # a prefix
    assert bench.vocabulary(0) == bench.vocabulary(0) and len(set(bench.vocabulary(0))) == 3000


# ------------------------------------------------------------------------------- arithmetic


def test_steady_state_skips_warmup_and_divides_work_by_time():
    seconds = [5.0, 3.0, 1.0, 2.0, 1.0]
    tokens = [100, 100, 400, 600, 200]
    s = bench.steady_state(seconds, tokens, batch=8, warmup=2)
    assert s["steps"] == 3
    assert s["pairs_per_s"] == pytest.approx(24 / 4.0)  # not the mean of the per-step rates
    assert s["tokens_per_s"] == pytest.approx(1200 / 4.0)
    assert s["step_s_median"] == 1.0 and s["pairs_per_s_median_step"] == 8.0  # a stalled step moves it not
    assert bench.steady_state([1.0], [10], batch=8, warmup=2)["pairs_per_s"] is None


def test_interval_rate_uses_step_end_times_after_warmup():
    ends = [10.0, 12.0, 13.0, 15.0]  # the end of step 2 starts the clock
    r = bench.interval_rate(ends, [9, 9, 30, 50], batch=8, warmup=2)
    assert r["pairs_per_s"] == pytest.approx(16 / 3.0)
    assert r["tokens_per_s"] == pytest.approx(80 / 3.0)
    assert bench.interval_rate(ends[:2], [1, 1], batch=8, warmup=2)["pairs_per_s"] is None


def test_flops_are_six_n_per_token_plus_two_n_for_the_reference_forward():
    assert bench.flops_per_token(1000) == 8000
    assert bench.flops_per_token(1000, reference_forward=False) == 6000
    assert bench.model_flops_per_s(4_000_000, 2500.0) == pytest.approx(8 * 4e6 * 2500)
    assert bench.model_flops_per_s(4_000_000, 2500.0, reference_forward=False) == pytest.approx(6e10)
    assert bench.model_flops_per_s(1, None) is None


def test_ratios_are_raydpo_over_trl_and_tolerate_missing_values():
    ours = {"pairs_per_s": 5.0, "tokens_per_s": 500.0, "wall_s": 60.0, "first_step_s": 30.0,
            "peak_rss_train_mb": 900.0, "pairs_per_s_interval": None}  # fmt: skip
    theirs = {"pairs_per_s": 10.0, "tokens_per_s": 1000.0, "wall_s": 20.0, "first_step_s": 0.0,
              "peak_rss_train_mb": 600.0, "pairs_per_s_interval": 8.0}  # fmt: skip
    r = bench.ratios(ours, theirs)
    assert r["pairs_per_s"] == 0.5 and r["tokens_per_s"] == 0.5
    assert r["wall_s"] == 3.0 and r["peak_rss_train_mb"] == 1.5
    assert r["first_step_s"] is None and r["pairs_per_s_interval"] is None  # 0 and missing: no ratio
    assert set(r) == set(bench.RATIO_KEYS)


def test_step1_agreement():
    assert bench.agree(math.log(2), math.log(2) + 5e-5, 1e-4)
    assert not bench.agree(0.6931, 0.6933, 1e-4)
    assert bench.agree(-812.30, -812.35, 1e-4, relative=True)  # within 1e-4 of the value's size
    assert not bench.agree(-812.0, -813.0, 1e-4, relative=True)
    assert bench.agree(None, 1.0, 1e-4) is None


# ---------------------------------------------------------------------------- result schema


def _fake_run(engine, wall, step_s, tokens_per_step=1500, steps=8, ref=True, loss=0.6931471805599453):
    run = {
        "engine": engine, "wall_s": wall, "first_step_s": wall / 3, "steps": steps,
        "step_seconds": [step_s * (3 if k == 0 else 1) for k in range(steps)],
        "step_tokens": [float(tokens_per_step)] * steps,
        "step_end_s": [wall / 3 + step_s * k for k in range(steps)],
        "step1": {"loss": loss, "logps/chosen": -512.25},
        "peak_rss_mb": {"train": 800.0, "ray_other": 900.0 if engine == "raydpo" else None},
        "phases_s": {"start_ray_s": 4.0, "fit_s": 30.0, "other_s": 1.0} if engine == "raydpo" else {},
        "reference_forward_in_step": ref,
    }  # fmt: skip
    return bench.add_rates(run, bench.resolve_settings(quick=True))


def _fake_result(with_trl=True):
    settings = bench.resolve_settings(quick=True)
    runs = [_fake_run("raydpo", 60.0, 1.0), _fake_run(bench.NO_RAY, 3.0, 0.25)]  # the diagnostic: fastest
    if with_trl:
        runs += [_fake_run("trl", 20.0, 0.5), _fake_run("trl+precompute", 18.0, 0.4, ref=False)]
    summary = bench.summarize_shape(runs, params=3_500_000, peak=50e9)
    return {
        "schema": bench.SCHEMA, "created": "2025-01-01T00:00:00+00:00", "command": ["raydpo", "bench"],
        "machine": {"cpu_count": 2, "python": "3.12.0", "torch": "2.13.0", "ray": "2.60.0",
                    "trl": "1.16.0" if with_trl else None, "transformers": "5.24.0", "raydpo": "0.1.0",
                    "platform": "Linux"},
        "settings": bench.asdict(settings),
        "model": {"params": 4_600_000, "matmul_params": 3_500_000, "layers": 4, "hidden": 256,
                  "vocab_size": 4096},
        "peak": {"flops": 50e9, "flops_1_thread": 26e9, "threads": 2},
        "results": {"short": {"data": {"pairs": 64}, "runs": runs, **summary}},
        "notes": list(bench.NOTES), "total_s": 150.0,
    }  # fmt: skip


def test_a_fake_result_matches_the_schema_through_json():
    result = json.loads(json.dumps(_fake_result()))
    assert bench.schema_problems(result) == []
    short = result["results"]["short"]
    assert short["trl_variant"] == "trl+precompute"  # the faster TRL variant by wall time, never raydpo-noray
    assert short["ratios"]["wall_s"] == pytest.approx(60.0 / 18.0)
    assert short["ratios"]["pairs_per_s"] == pytest.approx(0.4)  # 8 pairs / 1.0 s vs 8 / 0.4 s
    assert short["ratios"]["pairs_per_s_median_step"] == pytest.approx(0.4)
    assert short["step1"]["loss_agree"] and short["step1"]["logps_chosen_agree"]
    assert short["step1"]["tokens_per_step_agree"]
    eng = short["engines"]
    assert eng["raydpo"]["model_flops_per_s"] == pytest.approx(8 * 3_500_000 * 1500)  # 1500 tokens / 1 s
    assert eng["trl+precompute"]["model_flops_per_s"] == pytest.approx(6 * 3_500_000 * 1500 / 0.4)
    assert eng["raydpo"]["fraction_of_peak"] == pytest.approx(8 * 3.5e6 * 1500 / 50e9)
    assert short["raydpo_phases_s"]["start_ray_s"] == 4.0
    assert short["ray_step_overhead"] == {"median_step_s_ray": 1.0, "median_step_s_noray": 0.25, "ratio": 4.0}
    text = bench.format_report(result)
    assert "trl+precompute*" in text and f"{bench.NO_RAY} (diag.)" in text and "step-1 loss" in text


def test_phases_that_overlap_count_once_and_unequal_tokens_per_step_are_explained():
    # Ray start 1-3 s; fit 3-10 s with the data stage (3-4 s) and the scoring (4-6 s) inside it
    starts = {"start_ray": 1.0, "fit": 3.0, "build_datasets": 3.0, "attach_reference": 4.0}
    seconds = {"start_ray": 2.0, "fit": 7.0, "build_datasets": 1.0, "attach_reference": 2.0}
    assert bench.covered(starts, seconds) == pytest.approx(9.0)
    assert bench.covered({"a": 0.0, "b": 5.0}, {"a": 2.0, "b": 1.0}) == pytest.approx(3.0)  # a gap
    res = {"engines": {"raydpo": {"tokens_per_step": 1518.4}, "trl": {"tokens_per_step": 2571.2}},
           "trl_variant": "trl"}  # fmt: skip
    assert bench.tokens_per_step_note(res).startswith("raydpo 1518 vs TRL 2571 (")
    assert bench.tokens_per_step_note({**res, "trl_variant": "trl+precompute"}) == "DIFFER"


def test_a_result_without_trl_still_matches_the_schema():
    result = json.loads(json.dumps(_fake_result(with_trl=False)))
    assert bench.schema_problems(result) == []
    short = result["results"]["short"]
    assert short["trl_variant"] is None and short["ratios"] is None and short["step1"] is None
    assert "raydpo" in bench.format_report(result)


def test_schema_problems_name_what_is_missing_or_mistyped():
    result = json.loads(json.dumps(_fake_result()))
    del result["machine"]["torch"]
    result["settings"]["steps"] = "8"
    del result["results"]["short"]["runs"][0]["wall_s"]
    result["results"]["short"]["engines"]["trl"]["pairs_per_s"] = "fast"
    problems = bench.schema_problems(result)
    assert "machine.torch: missing" in problems
    assert "settings.steps: str" in problems
    assert "results.short.runs[0].wall_s: missing" in problems
    assert "results.short.engines.trl.pairs_per_s: str" in problems
    assert bench.schema_problems({"schema": bench.SCHEMA})
    assert bench.schema_problems([]) == ["result: not an object"]


# ------------------------------------------------------------------------------- arguments


def test_settings_defaults_and_quick():
    full = bench.resolve_settings()
    assert full.shapes == ["long", "short"]
    assert (full.steps, full.pairs, full.batch_size, full.rounds) == (24, 192, 8, 2)
    assert 0 < full.warmup_steps < full.steps
    assert full.raydpo_overrides == list(bench.RAYDPO_DEFAULTS)
    assert "train.precompute_reference=true" in bench.RAYDPO_DEFAULTS  # raydpo's fastest exact settings
    live = bench.resolve_settings(overrides=["train.precompute_reference=false"])
    assert live.raydpo_overrides == [*bench.RAYDPO_DEFAULTS[:2], "train.precompute_reference=false"]
    quick = bench.resolve_settings(quick=True)
    assert quick.shapes == ["short"] and quick.steps < full.steps and quick.rounds == 1
    assert quick.pairs == quick.steps * quick.batch_size
    assert bench.resolve_settings(quick=True, shape="long").shapes == ["long"]
    assert bench.resolve_settings(shape="both", steps=3, pairs=40).pairs == 40
    with pytest.raises(UserError, match="multiple of the batch size"):
        bench.resolve_settings(pairs=12)
    with pytest.raises(UserError, match="at least 1"):
        bench.resolve_settings(steps=0)


def test_cli_parses_bench():
    args = build_parser().parse_args(["bench"])
    assert args.func is _cmd_bench
    assert (args.quick, args.shape, args.pairs, args.steps, args.out) == (False, None, None, None, None)
    args = build_parser().parse_args(
        ["bench", "--quick", "--shape", "long", "--pairs", "64", "--steps", "8", "--out", "b.json"]
    )
    assert (args.quick, args.shape, args.pairs, args.steps, args.out) == (True, "long", 64, 8, "b.json")
    assert args.batch_size == 8 and args.rounds is None and not args.keep
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--shape", "medium"])


def test_cli_bench_passes_its_arguments(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda **kw: seen.update(kw))
    args = build_parser().parse_args(["bench", "--quick", "--steps", "4", "--rounds", "2"])
    assert _cmd_bench(args) == 0
    assert seen["quick"] and seen["steps"] == 4 and seen["rounds"] == 2 and seen["shape"] is None


# ------------------------------------------------------------------------------- GPU settings


def test_model_device_and_precision_settings():
    cpu = bench.resolve_settings(quick=True)
    assert (cpu.model, cpu.device, cpu.precision, cpu.attn_implementation) == ("tiny", "cpu", "fp32", None)
    bf16 = bench.resolve_settings(quick=True, model="0.5b", precision="bf16")
    assert (bf16.model, bf16.device, bf16.precision) == ("0.5b", "cpu", "bf16")
    auto = bench.resolve_settings(quick=True, device="auto")
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert auto.precision == ("bf16" if auto.device == "cuda" else "fp32")
    for kwargs, flag in (({"model": "7b"}, "--model '7b'"), ({"device": "tpu"}, "--device 'tpu'"),
                         ({"precision": "fp16"}, "--precision 'fp16'")):  # fmt: skip
        with pytest.raises(UserError, match=flag):
            bench.resolve_settings(**kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: torch sees no GPU"):
            bench.resolve_settings(device="cuda")


def test_a_gpu_run_configures_both_engines_alike(tmp_path):
    """On cuda: raydpo's one worker on the GPU with bf16 autocast and SDPA; TRL on the GPU with bf16
    autocast, SDPA and float32 weights. On cpu: neither changes from the CPU defaults."""
    gpu = bench.Settings(shapes=["short"], steps=2, pairs=16, device="cuda", precision="bf16",
                         attn_implementation="sdpa")  # fmt: skip
    cfg = bench.raydpo_config(gpu, str(tmp_path / "m"), tmp_path / "p.jsonl", tmp_path, "r", 2)
    assert cfg.scaling.use_gpu and cfg.scaling.precision == "bf16" and cfg.scaling.num_workers == 1
    assert cfg.model.attn_implementation == "sdpa" and cfg.model.dtype == "float32"
    spec = {"output_dir": str(tmp_path), "batch_size": 8, "steps": 2, "lr": 1e-4, "beta": 0.1,
            "loss": "sigmoid", "seed": 0, "precompute": False, "device": "cuda", "precision": "bf16",
            "attn_implementation": "sdpa"}  # fmt: skip
    trl = bench.trl_settings(spec)
    assert not trl["use_cpu"] and trl["bf16"] and not trl["fp16"]
    assert trl["model_init_kwargs"] == {"attn_implementation": "sdpa"}  # TRL's dtype default: float32
    cpu = bench.resolve_settings(quick=True)
    cfg = bench.raydpo_config(cpu, str(tmp_path / "m"), tmp_path / "p.jsonl", tmp_path, "r", 2)
    assert (
        not cfg.scaling.use_gpu and cfg.scaling.precision == "fp32" and cfg.model.attn_implementation is None
    )
    trl = bench.trl_settings({**spec, "device": "cpu", "precision": "fp32", "attn_implementation": None})
    assert trl["use_cpu"] and not trl["bf16"] and trl["model_init_kwargs"] is None


def test_the_half_billion_model_has_qwen_half_b_matmul_work():
    """`--model 0.5b`: Qwen2.5-0.5B's transformer body (about 358M parameters in matmuls) on the bench's
    4k vocabulary; built on the meta device here, so nothing is allocated."""
    from transformers import AutoModelForCausalLM

    from raydpo.models.tiny import build_tokenizer, model_config

    spec = bench.MODELS["0.5b"]
    tok = build_tokenizer("llama", corpus=["a b c"] * 10, vocab_size=spec["vocab_size"])
    cfg = model_config(
        tok, spec["arch"], **{k: v for k, v in spec.items() if k not in ("arch", "vocab_size")}
    )
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.tie_word_embeddings) == (24, 896, 14, 2, 4864, True)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    matmul = total - model.get_input_embeddings().weight.numel()
    assert 355e6 < matmul < 362e6


def test_matmul_peak_in_each_precision():
    assert bench.matmul_peak(128, reps=2) > 0
    assert bench.matmul_peak(128, reps=2, threads=1, precision="bf16") > 0


def test_a_gpu_result_reports_tflops_and_gpu_memory():
    result = json.loads(json.dumps(_fake_result()))
    result["peak"].update(device="NVIDIA H100 80GB HBM3", precision="bf16", matmul_size=8192, flops=7.0e14)
    result["settings"].update(device="cuda", precision="bf16", attn_implementation="sdpa")
    short = result["results"]["short"]
    short["engines"]["raydpo"]["peak_gpu_train_mb"] = 3000.0
    short["engines"]["trl+precompute"]["peak_gpu_train_mb"] = 6000.0
    short["ratios"]["peak_gpu_train_mb"] = 0.5
    assert bench.schema_problems(result) == []
    text = bench.format_report(result)
    assert "bfloat16 matmul (torch.mm 8192², best of 8) on NVIDIA H100 80GB HBM3: 700.0 TFLOP/s" in text
    assert "peak GPU memory 0.50x" in text and "cuda, bf16, attention sdpa" in text


def test_cli_bench_passes_model_device_and_precision(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda **kw: seen.update(kw))
    args = build_parser().parse_args(["bench", "--model", "0.5b", "--device", "cpu", "--precision", "bf16"])
    assert _cmd_bench(args) == 0
    assert (seen["model"], seen["device"], seen["precision"]) == ("0.5b", "cpu", "bf16")
    args = build_parser().parse_args(["bench"])
    assert (args.model, args.device, args.precision) == ("tiny", "auto", None)
    for flag, allowed in (
        ("--model", bench.MODELS),
        ("--device", bench.DEVICES),
        ("--precision", bench.PRECISIONS),
    ):
        for value in allowed:  # the CLI's choices (it parses without importing the bench) are the bench's
            assert build_parser().parse_args(["bench", flag, value]) is not None


def test_on_a_gpu_the_defaults_are_bf16_sdpa_and_the_live_reference(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU machine's torch says
    gpu = bench.resolve_settings(device="auto", model="0.5b")
    assert (gpu.device, gpu.precision, gpu.attn_implementation) == ("cuda", "bf16", "sdpa")
    assert gpu.raydpo_overrides == list(bench.GPU_RAYDPO_DEFAULTS)
    assert "train.precompute_reference=false" in gpu.raydpo_overrides  # scoring runs on CPUs (float32)
    given = bench.resolve_settings(
        device="cuda", precision="fp32", overrides=["train.precompute_reference=true"]
    )
    assert given.precision == "fp32" and given.raydpo_overrides[-1] == "train.precompute_reference=true"

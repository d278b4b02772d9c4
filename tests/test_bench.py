"""`raydpo bench` (benchmarks/bench.py) without running a benchmark: the pair generator, the rate, FLOP/s
and ratio arithmetic, the JSON schema of a result assembled from fake runs, and the CLI arguments."""

import json
import math
import sys
from pathlib import Path

import pytest

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

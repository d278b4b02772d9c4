"""The `raydpo` command: parse arguments, then call one function. No logic of its own.

User errors (bad config, bad data, missing paths) print one line `raydpo: error: ...` and exit 2.
Each verb imports its module when it runs (deferred: torch, Ray and transformers take seconds to
import, and `raydpo --help` should not wait for them).
"""

from __future__ import annotations

import argparse
import sys

from raydpo import __version__
from raydpo.errors import UserError
from raydpo.redact import redact


def _cmd_train(args) -> int:
    from raydpo.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors show before Ray and the engine load
    from raydpo.engine.inputs import check_paths

    check_paths(cfg)  # a misspelt path too
    from raydpo.evaluate.checkpoints import train_and_evaluate  # methods.train, then eval.every_steps

    train_and_evaluate(cfg, resume=args.resume)
    return 0


def _cmd_sweep(args) -> int:
    from raydpo.sweep import run_sweep

    out = run_sweep(args.sweep_file, args.overrides, resume=args.resume)
    return 1 if out["failed"] else 0


def _cmd_task_prepare(args) -> int:
    from raydpo.tasks.prepare import prepare

    manifest = prepare(args.dir, size=args.size, seed=args.seed)
    print(
        f"task ready: {manifest['root']}/task.json "
        f"(SFT policy {manifest['sft_model']}, pairs {manifest['pairs']})"
    )
    return 0


def _cmd_eval(args) -> int:
    from raydpo.evaluate.run import run_eval

    run_eval(args.config, args.overrides)
    return 0


def _cmd_demo(args) -> int:
    from raydpo.demo import run_demo

    run_demo(size=args.size, root=args.dir, seed=args.seed, seeds=args.seeds)
    return 0


def _cmd_bench(args) -> int:
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent  # an editable install made before `benchmarks`
    if (checkout / "benchmarks" / "bench.py").is_file() and str(checkout) not in sys.path:  # maps raydpo only
        sys.path.append(str(checkout))
    try:
        from benchmarks.bench import run_bench  # the top-level `benchmarks` package, beside raydpo
    except ModuleNotFoundError as e:
        if e.name != "benchmarks":
            raise
        raise UserError("raydpo bench needs the `benchmarks` package (a source checkout)") from None

    run_bench(quick=args.quick, shape=args.shape, pairs=args.pairs, steps=args.steps, out=args.out,
              rounds=args.rounds, batch_size=args.batch_size, keep=args.keep, overrides=args.set,
              model=args.model, device=args.device, precision=args.precision)  # fmt: skip
    return 0


def _cmd_cluster(args) -> int:
    from raydpo import cluster

    if args.cluster_command == "up":
        cluster.up(args.dir, workers=args.workers, cpus=args.cpus, artifacts=args.artifacts,
                   mlflow=not args.no_mlflow)  # fmt: skip
    elif args.cluster_command == "status":
        state = cluster.status(args.dir)
        print(cluster.describe(state))
        for name, alive in state["alive"].items():
            print(f"  {name}: {'running' if alive else 'NOT RUNNING'}")
        print(f"  Ray nodes alive: {state['ray_nodes_alive']} of {len(state['nodes'])}")
        return 0 if all(state["alive"].values()) and state["ray_nodes_alive"] == len(state["nodes"]) else 1
    else:
        cluster.down(args.dir)
    return 0


def _cmd_data_validate(args) -> int:
    from raydpo.config import build_config
    from raydpo.data.validate import chat_renderer, validate_source

    overrides = [f"data.{o}" for o in args.overrides]
    cfg = build_config({"data": {"source": args.source}}, "data validate", overrides)
    render = None
    if args.tokenizer:
        from raydpo.config import ModelConfig
        from raydpo.models.loading import load_tokenizer

        render = chat_renderer(load_tokenizer(ModelConfig(policy=args.tokenizer)))
    qpath = args.quarantine or "quarantine.jsonl"
    _, report = validate_source(cfg.data, qpath, render_chat=render)
    print(report.summary())
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raydpo", description="Direct Preference Optimization on Ray, tracked in MLflow."
    )
    p.add_argument("--version", action="version", version=f"raydpo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train from a YAML config: DPO, or method sft, preferred_ft, reward_model, ppo, ppo_gt, "
        "unlikelihood",
    )
    t.add_argument("config", nargs="?", help="YAML config; omitted = the built-in defaults")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. loss.beta=0.1")
    t.add_argument("--resume", action="store_true",
                   help="continue a run directory that holds a run with another config")  # fmt: skip
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sweep", help="run a sweep file on Ray Tune (one Ray Train run per trial)")
    s.add_argument("sweep_file", help="YAML sweep definition, e.g. sweeps/sentiment.yaml")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    # default=[]: otherwise argparse lists `overrides` as required too when the sweep file is missing
    s.add_argument("overrides", nargs="*", default=[],
                   help="sweep fields (num_samples=2) or base config keys (train.max_steps=8)")  # fmt: skip
    s.set_defaults(func=_cmd_sweep)

    e = sub.add_parser("eval", help="sample policies, judge them against baselines, log win rates to MLflow")
    e.add_argument("config", help="YAML eval config (policies, baselines, judge, prompts, reference)")
    # default=[]: otherwise argparse lists `overrides` as required too when the config is missing
    e.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the eval config")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser(
        "demo",
        help="the DPO paper's sentiment comparison end to end: task, DPO sweep, baselines, eval, table, plot",
    )
    m.add_argument("--size", choices=["tiny", "full"], default="full",
                   help="full (default): the paper's grids on the full task; tiny: a smaller task and grid "
                        "(the test suite runs it)")  # fmt: skip
    m.add_argument("--dir", help="where everything goes (default runs/demo-SIZE; reused when run again)")
    m.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    m.add_argument("--seeds", type=_positive, default=1,
                   help="train and evaluate everything with seeds SEED … SEED+N−1; the paper check compares "
                        "seed-level frontiers (default 1: the check then says inconclusive)")  # fmt: skip
    m.set_defaults(func=_cmd_demo)

    t = sub.add_parser("task", help="built-in offline tasks")
    tsub = t.add_subparsers(dest="task_name", required=True)
    sent = tsub.add_parser(
        "sentiment", help="controlled sentiment generation (the DPO paper's §6.1, offline)"
    )
    ssub = sent.add_subparsers(dest="task_command", required=True)
    prep = ssub.add_parser("prepare", help="build corpus, tokenizer, SFT policy and preference pairs in DIR")
    prep.add_argument("dir", help="folder for the task's files (reused when already prepared)")
    prep.add_argument("--size", choices=["tiny", "full"], default="full", help="tiny: for tests (~1 min)")
    prep.add_argument("--seed", type=int, default=0)
    prep.set_defaults(func=_cmd_task_prepare)

    b = sub.add_parser(
        "bench", help="DPO training throughput: raydpo's own path against TRL's DPOTrainer, side by side"
    )
    b.add_argument("--quick", action="store_true",
                   help="8 steps, the short shape, 1 round (a few minutes on 2 CPU cores)")  # fmt: skip
    b.add_argument("--shape", choices=["long", "short", "both"],
                   help="long prompts, short prompts, or both (default both; --quick: short)")  # fmt: skip
    b.add_argument("--pairs", type=int, help="preference pairs per shape (default steps × batch size)")
    b.add_argument("--steps", type=int, help="optimizer steps per training call (default 24; --quick: 8)")
    b.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    b.add_argument("--rounds", type=int, help="alternating rounds of every engine (default 2; --quick: 1)")
    b.add_argument("--model", choices=["tiny", "0.5b"], default="tiny",
                   help="tiny: Llama, 4 layers, hidden 256 (default); 0.5b: Qwen2.5-0.5B's transformer body "
                        "(24 layers, hidden 896), random-init, for a GPU")  # fmt: skip
    b.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: cuda where torch sees a GPU (raydpo's worker and TRL take turns), else cpu",
    )
    b.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: autocast in both engines (default: bf16 and SDPA on cuda, else fp32)",
    )
    b.add_argument("--out", help="JSON results file (default runs/bench/bench-DATE-TIME.json)")
    b.add_argument("--keep", action="store_true", help="keep the temporary work directory (model, runs)")
    b.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                   help="a raydpo training setting for raydpo's runs, e.g. train.precompute_reference=false "
                        "(repeatable; recorded in the JSON; defaults train.prefix_sharing=true "
                        "train.grad_accum_steps=4 train.precompute_reference=true; on cuda "
                        "train.precompute_reference=false)")  # fmt: skip
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser("cluster", help="a local multi-node Ray cluster with token auth and an MLflow server")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    for verb, text in (("up", "start a Ray head, worker nodes and an MLflow server on 127.0.0.1"),
                       ("status", "addresses, processes and Ray nodes alive (exit 1 when one is down)"),
                       ("down", "stop exactly the processes `up` started")):  # fmt: skip
        cv = csub.add_parser(verb, help=text)
        cv.add_argument("--dir", help="the cluster's state folder (default $RAYDPO_HOME/cluster)")
        if verb == "up":
            cv.add_argument("--workers", type=int, default=1, help="Ray nodes besides the head (default 1)")
            cv.add_argument("--cpus", type=float, default=2, help="logical CPUs per node (default 2)")
            cv.add_argument("--artifacts", help="MLflow artifact store: a folder or s3://bucket/prefix "
                            "(default <dir>/mlartifacts)")  # fmt: skip
            cv.add_argument("--no-mlflow", action="store_true", help="no MLflow server")
    c.set_defaults(func=_cmd_cluster)

    d = sub.add_parser("data", help="inspect preference data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("validate", help="validate a source; print counts per quarantine reason")
    v.add_argument(
        "source", help="jsonl / parquet file, HF save_to_disk dir, HF hub name, builtin:tiny-prefs"
    )
    v.add_argument(
        "overrides", nargs="*", help="data config overrides, e.g. columns.prompt=question format=jsonl"
    )
    v.add_argument("--quarantine", help="where bad rows go (default ./quarantine.jsonl)")
    v.add_argument("--tokenizer", help="tokenizer whose chat template renders conversational rows")
    v.set_defaults(func=_cmd_data_validate)
    return p


def quiet_libraries() -> None:
    """Keep library progress bars and advice off the console; raydpo prints its own progress."""
    import os

    if not os.environ.get("RAY_ADDRESS"):
        # A local Ray binds to 127.0.0.1 only when Ray thinks single-node (read when ray is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers reads HF_HUB_DISABLE_PROGRESS_BARS when it is imported; importing it here to say
    # so again would cost every command (`--help` too) about a second. An in-process caller may have
    # imported it already:
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in argv[1:]:  # `raydpo sweep FILE key=value --resume` and `... --resume key=value` alike
        argv = [argv[0], "--resume", *(a for a in argv[1:] if a != "--resume")]
    args = parser.parse_args(argv)
    if (
        args.command == "train" and args.config and "=" in args.config
    ):  # `raydpo train key=value` without a file
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        return args.func(args)
    except UserError as e:
        print(f"raydpo: error: {redact(str(e))}", file=sys.stderr)  # no password or token on the console
        return 2
    except KeyboardInterrupt:
        print("raydpo: interrupted", file=sys.stderr)
        return 130

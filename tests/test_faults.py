"""Non-finite values and damaged checkpoints, through the real training loop (no mocked steps)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from raydpo.config import build_config
from raydpo.data.builtin import tiny_prefs
from raydpo.data.schema import PreferenceRecord
from raydpo.data.tokenize import pad_token_id, tokenize_pair
from raydpo.engine.checkpointing import (
    CheckpointError,
    load_checkpoint,
    tidy_run_dir,
    usable,
    verify,
    write_manifest,
)
from raydpo.engine.local import train_local
from raydpo.methods import METHODS
from raydpo.models.loading import load_reference, load_tokenizer

PROMPTS = ["the film was", "i thought the plot", "this movie", "the actors were"]


def _cfg(model_dir, tmp_path, method="dpo", **train):
    return build_config({
        "method": method, "model": {"policy": str(model_dir)}, "optim": {"lr": 1e-3},
        "train": {"batch_size": 4, "max_steps": 3, "seed": 0, "output_dir": str(tmp_path), **train},
        "ppo": {"rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4},
        "tracking": {"enabled": False},
    })  # fmt: skip


def _rows(cfg, tok):
    if METHODS[cfg.method].data == "prompts":
        return PROMPTS
    return [tokenize_pair(PreferenceRecord(**r), tok, 64, 32) for r in tiny_prefs(n=16)]


def _inf_grad_at(policy, call: int):
    """A real backward pass whose gradient of one parameter is infinite on the `call`-th backward."""
    count = {"n": 0}
    param = next(p for p in policy.parameters() if p.requires_grad)

    def hook(g):
        count["n"] += 1
        return torch.full_like(g, float("inf")) if count["n"] == call else g

    param.register_hook(hook)


@pytest.mark.parametrize("method", ["dpo", "sft", "preferred_ft", "reward_model", "ppo_gt"])
def test_an_infinite_gradient_stops_every_method_before_the_update(tiny_llama_dir, tmp_path, method):
    """A finite loss with an infinite gradient: the run stops at that step, naming it (and, with pair
    data, the pair ids), and the weights are untouched."""
    cfg = _cfg(tiny_llama_dir, tmp_path, method)
    torch.manual_seed(0)
    m = METHODS[method]
    policy = m.load_model(cfg, None)
    reference = load_reference(cfg.model) if m.uses_reference(cfg) else None
    before = [p.detach().clone() for p in policy.parameters()]
    _inf_grad_at(policy, 1)
    tok = load_tokenizer(cfg.model)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm \(inf\) at step 1") as e:
        train_local(cfg, m, _rows(cfg, tok), pad_token_id(tok), policy=policy, reference=reference)
    if m.data != "prompts":
        assert "pairs tiny-" in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_skip_nonfinite_skips_counts_and_never_checkpoints_bad_weights(tiny_llama_dir, tmp_path):
    cfg = _cfg(tiny_llama_dir, tmp_path, skip_nonfinite=True, checkpoint_every=1)
    tok = load_tokenizer(cfg.model)
    policy = METHODS["dpo"].load_model(cfg, None)
    reference = METHODS["dpo"].load_model(cfg, None).eval().requires_grad_(False)
    _inf_grad_at(policy, 2)  # the second step's backward
    hist = train_local(cfg, METHODS["dpo"], _rows(cfg, tok), pad_token_id(tok), policy=policy,
                       reference=reference, checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    assert [h["nonfinite_skipped"] for h in hist] == [0, 1, 1]
    assert hist[1]["grad_norm"] == float("inf") and hist[2]["grad_norm"] < float("inf")
    for step in (1, 2, 3):
        weights = load_file(tmp_path / "ckpt" / f"checkpoint_{step:06d}" / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
    state, _ = load_checkpoint(tmp_path / "ckpt" / "checkpoint_000003")
    assert state["nonfinite_skipped"] == 1  # the count survives a resume


def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_used(tiny_llama_dir, tmp_path):
    cfg = _cfg(tiny_llama_dir, tmp_path, max_steps=4, checkpoint_every=2)
    tok = load_tokenizer(cfg.model)
    full = train_local(cfg, METHODS["dpo"], _rows(cfg, tok), pad_token_id(tok), checkpoint_dir=tmp_path / "c")
    last, older = tmp_path / "c" / "checkpoint_000004", tmp_path / "c" / "checkpoint_000002"
    state = last / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a crash
    with pytest.raises(CheckpointError, match=r"checkpoint_000004: trainer_state.pt has \d+ bytes"):
        load_checkpoint(last)
    lines: list[str] = []
    assert usable(last, log=lines.append) == older
    assert "checkpoint_000004" in lines[0] and "checkpoint_000002" in lines[0]
    resumed = train_local(cfg, METHODS["dpo"], _rows(cfg, tok), pad_token_id(tok), resume_from=older)
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full[2:]], abs=1e-6)
    (older / "manifest.json").unlink()  # an unfinished checkpoint: no manifest
    with pytest.raises(CheckpointError, match="no intact older checkpoint"):
        usable(last, log=lines.append)


def test_tidy_run_dir_removes_leftovers_and_reports_a_damaged_latest(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_a", "checkpoint_b"):
        (run / name).mkdir(parents=True)
        (run / name / "x.bin").write_bytes(b"12345")
        write_manifest(run / name)
    (run / "checkpoint_b" / "x.bin").write_bytes(b"12")  # the latest, damaged
    (run / "checkpoint_c").mkdir()  # a copy Ray never registered, never finished
    (run / "checkpoint_a.tmp").mkdir()
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in ("checkpoint_a", "checkpoint_b")]}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    lines: list[str] = []
    tidy_run_dir(run, log=lines.append)
    assert not (run / "checkpoint_c").exists() and not (run / "checkpoint_a.tmp").exists()
    assert (run / "checkpoint_b").exists()  # registered: kept (Ray needs it), reported, and skipped
    assert any("checkpoint_b: x.bin has 2 bytes" in x and "resuming from checkpoint_a" in x for x in lines)
    verify(run / "checkpoint_a")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_run_stops_on_an_infinite_gradient_with_no_checkpoint_after_it(ray_local, run_cfg, tmp_path,
                                                                            inject_fault):  # fmt: skip
    from raydpo.methods import train

    inject_fault(inf_grad_at_step=2)
    cfg = run_cfg(run_name="inf", train={"checkpoint_every": 1}, tracking={"enabled": False},
                  scaling={"num_workers": 1})  # fmt: skip
    with pytest.raises(RuntimeError, match=r"non-finite gradient norm \(inf\) at step 2, pairs tiny-"):
        train(cfg, log=lambda *_: None, stream=None)
    ckpts = sorted(d for d in (tmp_path / "runs" / "inf").glob("checkpoint_*") if d.is_dir())
    assert len(ckpts) == 1  # step 1 only: nothing after the bad step was written
    state, _ = load_checkpoint(ckpts[0])
    assert state["step"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_ray_resume_falls_back_past_a_damaged_latest_checkpoint(ray_local, run_cfg, tmp_path):
    from raydpo.methods import train

    over = {"train": {"max_steps": 4, "checkpoint_every": 2}, "tracking": {"enabled": False},
            "scaling": {"num_workers": 1}}  # fmt: skip
    train(run_cfg(run_name="dmg", **over), log=lambda *_: None, stream=None)
    run_dir = tmp_path / "runs" / "dmg"
    latest = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir())[-1]
    state = latest / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    lines: list[str] = []
    more = run_cfg(run_name="dmg", **{**over, "train": {"max_steps": 6, "checkpoint_every": 2}})
    out = train(more, log=lines.append, stream=None, resume=True)
    assert [h["step"] for h in out["history"]] == [3, 4, 5, 6]  # from the step-2 checkpoint
    assert any(latest.name in x and "trainer_state.pt has 100 bytes" in x for x in lines)

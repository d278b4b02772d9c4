"""RLHF with PPO (the paper's main baseline), as a Ray Train job: `method: ppo` (against a learned
reward model) or `method: ppo_gt` (against a ground-truth reward function such as VADER).

One iteration per worker: sample `ppo.rollout_batch_size` prompts, generate responses from the
policy, score them, shape per-token rewards with the KL to the frozen reference, estimate advantages
with GAE from a value head on the policy's last hidden state, then `ppo.ppo_epochs` passes of
clipped-PPO minibatch updates (gradients averaged over workers by DDP). The math is in ppo_core.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch

from raydpo.baselines import ppo_core as core
from raydpo.config import RunConfig


class PolicyWithValue(torch.nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (one module, so DDP syncs both)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions as in generate()
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=pos,
            output_hidden_states=True,
            use_cache=False,
        )
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)  # (B, T)
        return out.logits, values


def response_logprobs(logits, full_ids, tq: int):
    """(B, Tr) log π of each response token; logits (B, T, V) over [query (Tq); response (Tr)]."""
    logits = logits[:, tq - 1 : -1].float()  # the logit at t scores the token at t + 1
    targets = full_ids[:, tq:]
    return torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def reference_logprobs(reference, full_ids, full_mask, tq: int):
    pos = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = reference(
            input_ids=full_ids, attention_mask=full_mask, position_ids=pos, use_cache=False
        ).logits
    return response_logprobs(logits, full_ids, tq)


class Scorer:
    """Sequence scores: a reward model (method=ppo) or a ground-truth reward function (ppo_gt)."""

    def __init__(self, cfg: RunConfig, device):
        from raydpo.rewards import get_reward

        self.device, self.rm = device, None
        self.gt = get_reward(cfg.ppo.reward) if cfg.ppo.reward else None
        if cfg.method == "ppo":
            from raydpo.modeling import load_reward_model

            self.rm = load_reward_model(cfg.model, checkpoint=cfg.ppo.reward_model).to(device).eval()
            self.rm.requires_grad_(False)

    def __call__(self, rollout, full_ids, full_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores used for training (B,), ground-truth scores (B,) or None)."""
        gt = torch.tensor(self.gt(rollout.texts), device=self.device) if self.gt else None
        if self.rm is None:
            return gt, gt
        from raydpo.train.objectives import reward_scores

        with torch.no_grad():
            return reward_scores(self.rm, full_ids, full_mask), gt


def rollout_batch(
    cfg: RunConfig, model, tokenizer, prompts: list[str], it: int, rank: int, world: int, device
):
    """Sample this worker's prompts for iteration `it` and generate responses (seeded)."""
    from raydpo.generation import sample_responses

    rng = random.Random(cfg.train.seed * 1_000_003 + it * world + rank)
    batch = [prompts[rng.randrange(len(prompts))] for _ in range(cfg.ppo.rollout_batch_size)]
    ro = sample_responses(
        model.lm,
        tokenizer,
        batch,
        max_new_tokens=cfg.ppo.max_new_tokens,
        temperature=cfg.ppo.temperature,
        seed=cfg.train.seed + it * world + rank,
    )
    full_ids = torch.cat([ro.query_ids, ro.response_ids], 1).to(device)
    full_mask = torch.cat([ro.query_mask, ro.response_mask], 1).to(device)
    return ro, full_ids, full_mask


def ppo_epochs(cfg: RunConfig, model, opt, full_ids, full_mask, tq, mask, old_lp, old_v, adv, ret) -> dict:
    """Clipped PPO updates over minibatches for `ppo.ppo_epochs` passes; returns averaged stats."""
    stats: dict[str, float] = {}
    n, mb, count = full_ids.shape[0], cfg.ppo.minibatch_size, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.ppo.ppo_epochs):
        for idx in torch.randperm(n).split(mb):
            logits, values = model(full_ids[idx], full_mask[idx])
            lp = response_logprobs(logits, full_ids[idx], tq)
            v = values[:, tq - 1 : -1]  # the value of the state before each response token
            pg, s1 = core.ppo_policy_loss(lp, old_lp[idx], adv[idx], mask[idx], cfg.ppo.clip_range)
            vf, s2 = core.value_loss(v, old_v[idx], ret[idx], mask[idx], cfg.ppo.clip_range_value)
            loss = pg + cfg.ppo.vf_coef * vf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()
            for k, x in {"loss/policy": pg, "loss/value": vf, **s1, **s2}.items():
                stats[k] = stats.get(k, 0.0) + float(x)
            count += 1
    return {k: x / max(count, 1) for k, x in stats.items()}


def ppo_iteration(
    cfg: RunConfig, model, reference, scorer, kl_ctl, opt, tokenizer, prompts, it, rank, world, device
):
    """One PPO iteration (rollout → score → shape → GAE → updates). Returns this worker's metrics."""
    from raydpo.train.distributed import unwrap

    ro, full_ids, full_mask = rollout_batch(cfg, unwrap(model), tokenizer, prompts, it, rank, world, device)
    tq, mask = ro.query_ids.shape[1], ro.response_mask.to(device).float()
    with torch.no_grad():
        logits, values = model(full_ids, full_mask)
        old_lp = response_logprobs(logits, full_ids, tq)
        old_v = values[:, tq - 1 : -1]
    ref_lp = reference_logprobs(reference, full_ids, full_mask, tq)
    scores, gt = scorer(ro, full_ids, full_mask)
    rewards, kl = core.kl_penalized_rewards(scores, old_lp, ref_lp, mask, kl_ctl.value)
    adv, ret = core.gae(rewards, old_v, mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        adv = core.masked_whiten(adv, mask)
    stats = ppo_epochs(cfg, model, opt, full_ids, full_mask, tq, mask, old_lp, old_v, adv, ret)
    seq_kl = core.sequence_kl(old_lp, ref_lp, mask)  # (B,)
    metrics = {
        "reward/mean": scores.mean(),
        "reward/std": scores.std(),
        "kl": seq_kl.mean(),
        "kl_coef": torch.tensor(kl_ctl.value),
        "response_length": mask.sum(1).mean(),
        **stats,
    }
    if gt is not None:
        metrics["reward/gt_mean"] = gt.mean()
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}


def ppo_loop_per_worker(config: dict) -> None:
    """The Ray Train loop of PPO: wiring only (prepare, iterate, report, checkpoint)."""
    import ray.train

    from raydpo.modeling import load_policy, load_reference, load_tokenizer
    from raydpo.tracking import RunLogger
    from raydpo.train import distributed as du
    from raydpo.train.checkpointing import load_trainer_state, save_checkpoint, set_rng_state
    from raydpo.train.loop import build_optimizer, build_scheduler, seed_everything
    from raydpo.train.worker import report

    cfg = RunConfig.model_validate(config["run_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed)
    ckpt, state = ray.train.get_checkpoint(), None
    with ckpt.as_directory() if ckpt else tempfile.TemporaryDirectory() as d:
        if ckpt:
            state = load_trainer_state(Path(d))
        model = PolicyWithValue(load_policy(cfg.model, checkpoint=Path(d) / "model" if ckpt else None))
        if state:
            model.value_head.load_state_dict(state["value_head"])
    model, reference, device = du.prepare(model, load_reference(cfg.model), cfg.scaling)
    tokenizer, scorer = load_tokenizer(cfg.model), Scorer(cfg, device)
    kl_ctl = (
        core.AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        if cfg.ppo.kl_target
        else core.FixedKLController(cfg.ppo.kl_coef)
    )
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, config["total_steps"])  # stepped once per iteration
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        kl_ctl.value, start = state["kl_coef"], state["step"]
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    progress = config.get("progress")
    for it in range(start, config["total_steps"]):
        m = ppo_iteration(
            cfg, model, reference, scorer, kl_ctl, opt, tokenizer, config["prompts"], it, rank, world, device
        )
        sched.step()
        m = du.mean_across_workers(m)
        kl_ctl.update(m["kl"], cfg.ppo.rollout_batch_size * world)
        step = it + 1
        m["learning_rate"] = opt.param_groups[0]["lr"]
        if logger:
            logger.log_metrics(m, step)
        if progress is not None and rank == 0:
            progress.put_nowait({"step": step, **m})
        last = step == config["total_steps"]
        ckpt_now = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
        position = {
            "step": step,
            "kl_coef": float(kl_ctl.value),
            "value_head": du.unwrap(model).value_head.state_dict(),
        }

        def write(path, pos=position):  # rank 0 writes; the other ranks report no checkpoint
            return (
                save_checkpoint(path, du.unwrap(model).lm, None, opt.state_dict(), sched, pos)
                if rank == 0
                else None
            )

        report({"step": step, **m}, write if ckpt_now else None)


def load_prompts(cfg: RunConfig) -> list[str]:
    """The prompt strings of `data.source` (rows with a prompt column); bad rows are counted and
    the run stops above data.max_bad_fraction."""
    from raydpo.data.readers import iter_rows
    from raydpo.errors import DataError

    prompts, bad, col = [], 0, cfg.data.columns.prompt
    for _, row in iter_rows(cfg.data.source, cfg.data.format, cfg.data.split, cfg.data.max_rows):
        ok = isinstance(row, dict) and isinstance(row.get(col), str) and row[col].strip()
        prompts.append(row[col]) if ok else None
        bad += not ok
    total = len(prompts) + bad
    if not prompts or bad / max(total, 1) > cfg.data.max_bad_fraction:
        raise DataError(
            f"{cfg.data.source}: {bad} of {total} rows have no usable '{col}' string "
            f"(data.max_bad_fraction={cfg.data.max_bad_fraction})"
        )
    return prompts


def run_ppo(cfg: RunConfig, log=print, *, parent_run_id=None, tags=None, stream=sys.stderr) -> dict:
    """Driver: checks, MLflow run (raydpo.kind=baseline), TorchTrainer, final export of the policy."""
    from ray.train.torch import TorchTrainer

    from raydpo.errors import UserError
    from raydpo.rewards import get_reward
    from raydpo.tracking import RunLogger, start_or_resume_run, tracking_uri
    from raydpo.train.launch import Progress, export_final, fit_trainer, init_ray, ray_train_configs
    from raydpo.train.launch import preflight as train_preflight

    if cfg.method == "ppo" and not Path(cfg.ppo.reward_model).is_dir():
        raise UserError(f"ppo.reward_model: {cfg.ppo.reward_model!r} is not a directory")
    if cfg.method == "ppo_gt" and not cfg.ppo.reward:
        raise UserError("method=ppo_gt needs ppo.reward (a ground-truth reward name, e.g. vader)")
    if cfg.ppo.reward:
        get_reward(cfg.ppo.reward)  # unknown names fail here
    tokenizer = train_preflight(cfg, check_data=False)
    prompts = load_prompts(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    steps = (
        cfg.train.max_steps
        or max(1, len(prompts) // (cfg.ppo.rollout_batch_size * cfg.scaling.num_workers)) * cfg.train.epochs
    )
    uri = tracking_uri(cfg.tracking)
    run_id = start_or_resume_run(cfg, kind="baseline", parent_run_id=parent_run_id, tags=tags)
    log(
        f"{cfg.method} {cfg.run_name}: {len(prompts)} prompts, {steps} iterations, "
        f"{cfg.scaling.num_workers} worker(s)"
    )
    driver_log = RunLogger(uri, run_id)
    try:
        scaling, run_config = ray_train_configs(cfg)
        with Progress(steps, stream) as progress:
            trainer = TorchTrainer(
                ppo_loop_per_worker,
                train_loop_config={
                    "run_config": cfg.model_dump(mode="json"),
                    "total_steps": steps,
                    "prompts": prompts,
                    "tracking_uri": uri,
                    "mlflow_run_id": run_id,
                    "progress": progress.queue,
                },
                scaling_config=scaling,
                run_config=run_config,
            )
            result = fit_trainer(trainer)
    except BaseException:
        driver_log.finish("FAILED")
        raise
    final = export_final(Path(result.checkpoint.path), tokenizer, cfg.run_dir / "final")
    driver_log.finish()
    log(f"final model: {final}")
    return {
        "run_dir": str(cfg.run_dir),
        "final_model": str(final),
        "history": progress.history,
        "mlflow_run_id": run_id,
        "total_steps": steps,
    }

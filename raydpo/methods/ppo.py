"""RLHF with PPO (the paper's main baseline): `method: ppo` against a learned reward model, or
`method: ppo_gt` against a ground-truth reward function such as VADER.

The engine's loop runs it like every method; PPO adds a rollout phase (`PPORollout`). Each step a
worker samples `ppo.rollout_batch_size` prompts, generates responses at `ppo.temperature`, scores
them, shapes per-token rewards with the KL to the frozen reference, estimates advantages with GAE
from a value head on the policy's last hidden state, and returns `ppo.ppo_epochs` passes of
minibatches; the engine applies the clipped-PPO objective to each with one optimizer update
(gradients averaged over workers by DDP). The maths is in ops/ppo.py.

Log-probs of the policy, of the rollout-time policy and of the reference are all taken at the
sampling temperature, so the first update's ratio π/π_old is 1 and the KL of a policy to itself is 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raydpo.config import RunConfig
from raydpo.engine.distributed import adapters_off, unwrap
from raydpo.engine.method import Method, Metrics, Objective
from raydpo.errors import UserError
from raydpo.models.generation import sample_responses
from raydpo.models.loading import load_policy, load_reward_model, load_tokenizer
from raydpo.models.rewards import get_reward
from raydpo.models.scoring import score_texts
from raydpo.ops import ppo as core
from raydpo.ops.logprobs import left_padded_positions, response_logps, rollout_logps

VALUE_HEAD_FILE = "value_head.safetensors"


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
        """(logits (B, T, V), values (B, T)) of left-padded rows (positions as in generate())."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=left_padded_positions(attention_mask), output_hidden_states=True,
                      use_cache=False)  # fmt: skip
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        """The LM in Hugging Face layout plus value_head.safetensors; `state_dict` is a full state
        gathered under FSDP (keys lm.* and value_head.*), None to use the module's own."""
        lm_state, head = None, self.value_head.state_dict()
        if state_dict is not None:
            lm_state = {k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")}
            head = {k[len("value_head.") :]: v for k, v in state_dict.items() if k.startswith("value_head.")}
        self.lm.save_pretrained(path, state_dict=lm_state)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.items()}, str(Path(path) / VALUE_HEAD_FILE)
        )


def load_model(cfg: RunConfig, checkpoint: Path | None) -> PolicyWithValue:
    model = PolicyWithValue(load_policy(cfg.model, checkpoint=checkpoint))
    if checkpoint is not None and (Path(checkpoint) / VALUE_HEAD_FILE).is_file():
        model.value_head.load_state_dict(load_file(str(Path(checkpoint) / VALUE_HEAD_FILE)))
    return model


class PPORollout:
    """The rollout phase: sample → score → KL-shaped rewards → GAE → minibatches (engine.method.Rollout)."""

    def __init__(self, cfg: RunConfig, policy, reference, device, rank: int, world: int):
        self.cfg, self.policy, self.reference, self.device = cfg, policy, reference, device
        self.rank, self.world = rank, world
        self.tokenizer = load_tokenizer(cfg.model)
        self.gt = get_reward(cfg.ppo.reward) if cfg.ppo.reward else None
        self.rm = None
        if cfg.method == "ppo":
            self.rm = load_reward_model(cfg.model, checkpoint=cfg.ppo.reward_model).to(device).eval()
            self.rm.requires_grad_(False)
        p = cfg.ppo
        self.kl = core.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target \
            else core.FixedKLController(p.kl_coef)  # fmt: skip

    def score(self, prompts: list[str], texts: list[str]) -> tuple[torch.Tensor, Metrics]:
        """(scores that train the policy (B,), their metrics): the reward model's, or the ground truth's."""
        out: Metrics = {}
        gt = torch.tensor(self.gt(texts), device=self.device) if self.gt else None
        if gt is not None:
            out["reward/gt_mean"] = gt.mean()
        if self.rm is None:
            out["reward/gt_std"] = gt.std()
            return gt, out
        rm = torch.tensor(score_texts(self.rm, self.tokenizer, prompts, texts), device=self.device)
        out.update({"reward/rm_mean": rm.mean(), "reward/rm_std": rm.std()})
        return rm, out

    def reference_model(self):
        """The frozen reference; with `model.lora` and no `model.reference`, the policy's LM with its
        adapters off (a module whose forward runs the base model; the adapters are on again after)."""
        if self.reference is not None:
            return self.reference
        lm = unwrap(self.policy).lm

        def base(**inputs):
            with adapters_off(lm) as m:
                return m(**inputs)

        return base

    @torch.no_grad()
    def __call__(self, prompts: list[str], step: int) -> tuple[list[dict], Metrics]:
        cfg, p = self.cfg, self.cfg.ppo
        ro = sample_responses(
            unwrap(self.policy).lm,
            self.tokenizer,
            prompts,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            seed=cfg.train.seed + (step - 1) * self.world + self.rank,
        )
        full_ids = torch.cat([ro.query_ids, ro.response_ids], 1).to(self.device)  # (B, Tq + Tr)
        full_mask = torch.cat([ro.query_mask, ro.response_mask], 1).to(self.device)
        tq, mask = ro.query_ids.shape[1], ro.response_mask.to(self.device).float()  # mask (B, Tr)
        logits, values = self.policy(full_ids, full_mask)
        old_lp = response_logps(logits, full_ids, tq, p.temperature)  # (B, Tr)
        old_v = values[:, tq - 1 : -1]  # the value of the state before each response token
        ref_lp = rollout_logps(self.reference_model(), full_ids, full_mask, tq, p.temperature)
        scores, metrics = self.score(prompts, ro.texts)
        rewards, _ = core.kl_penalized_rewards(scores, old_lp, ref_lp, mask, self.kl.value)
        adv, ret = core.gae(rewards, old_v, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = core.masked_whiten(adv, mask)
        rows = {"full_ids": full_ids, "full_mask": full_mask, "old_lp": old_lp, "old_v": old_v, "adv": adv,
                "ret": ret, "mask": mask}  # fmt: skip
        minibatches = [
            {**{k: v[idx] for k, v in rows.items()}, "query_len": tq}
            for _ in range(p.ppo_epochs)
            for idx in torch.randperm(len(prompts)).split(p.minibatch_size)
        ]
        metrics.update(kl=core.sequence_kl(old_lp, ref_lp, mask).mean(), kl_coef=torch.tensor(self.kl.value),
                       response_length=mask.sum(1).mean())  # fmt: skip
        return minibatches, metrics

    def update(self, metrics: dict[str, float], world: int) -> None:
        self.kl.update(metrics["kl"], self.cfg.ppo.rollout_batch_size * world)

    def state_dict(self) -> dict:
        return {"kl_coef": float(self.kl.value)}

    def load_state_dict(self, state: dict) -> None:
        self.kl.value = state["kl_coef"]


def objective(cfg: RunConfig) -> Objective:
    """Clipped PPO surrogate + vf_coef · clipped value loss on one rollout minibatch."""
    p = cfg.ppo

    def ppo_loss(model, reference, mb: dict):
        tq = mb["query_len"]
        logits, values = model(mb["full_ids"], mb["full_mask"])
        lp = response_logps(logits, mb["full_ids"], tq, p.temperature)
        pg, s1 = core.ppo_policy_loss(lp, mb["old_lp"], mb["adv"], mb["mask"], p.clip_range)
        vf, s2 = core.value_loss(
            values[:, tq - 1 : -1], mb["old_v"], mb["ret"], mb["mask"], p.clip_range_value
        )
        loss = pg + p.vf_coef * vf
        return loss, {
            "loss": loss.detach(),
            "loss/policy": pg.detach(),
            "loss/value": vf.detach(),
            **s1,
            **s2,
        }

    return Objective(ppo_loss, paired=False)


def check(cfg: RunConfig) -> None:
    if cfg.method == "ppo" and not Path(cfg.ppo.reward_model).is_dir():
        raise UserError(f"ppo.reward_model: {cfg.ppo.reward_model!r} is not a directory")
    if cfg.method == "ppo_gt" and not cfg.ppo.reward:
        raise UserError("method=ppo_gt needs ppo.reward (a ground-truth reward name, e.g. vader)")
    if cfg.ppo.reward:
        get_reward(cfg.ppo.reward)  # unknown names fail here


def _uses_reference(cfg: RunConfig) -> bool:
    return True


_COMMON = ("loss", "loss/policy", "loss/value", "clipfrac", "approx_kl", "ratio_mean", "vf_clipfrac", "kl",
           "kl_coef", "response_length", "reward/gt_mean")  # fmt: skip
_SHOWN = (("reward", "reward/rm_mean"), ("gt reward", "reward/gt_mean"), ("kl", "kl"))
_RM = ("reward/rm_mean", "reward/rm_std")
PPO = Method(name="ppo", objective=objective, data="prompts", metrics=_COMMON + _RM,
             params=("ppo",), load_model=load_model, uses_reference=_uses_reference, rollout=PPORollout,
             check=check, progress=_SHOWN)  # fmt: skip
PPO_GT = Method(name="ppo_gt", objective=objective, data="prompts", metrics=_COMMON + ("reward/gt_std",),
                params=("ppo",), load_model=load_model, uses_reference=_uses_reference, rollout=PPORollout,
                check=check, progress=_SHOWN)  # fmt: skip

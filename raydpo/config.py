"""Run configuration: one pydantic model per concern, loaded from YAML with `key.sub=value` overrides.

Unknown keys are errors everywhere (`extra="forbid"`): a typo must never pass silently. Every
error names the field path, the bad value and what is allowed (`ConfigError`, exit 2 in the CLI).
`dump_config` writes the resolved config back to YAML; `load_config` of that file gives it again.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydpo.errors import ConfigError
from raydpo.losses import LOSSES, loss_params


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)  # adapter rank
    alpha: float = Field(32.0, gt=0)  # scaling numerator (lora_alpha)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapter input
    target_modules: list[str] | str = "all-linear"  # module names (or peft's "all-linear")


class ModelConfig(_Strict):
    policy: str = (
        "builtin:tiny-llama"  # HF hub name, local HF directory, or builtin:tiny-llama / builtin:tiny-gpt2
    )
    reference: str | None = None  # reference model; None = a frozen copy of the policy
    tokenizer: str | None = None  # tokenizer; None = the policy's
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype
    attn_implementation: Literal["eager", "sdpa"] | None = None  # None = transformers' default
    trust_remote_code: bool = False  # run model code from the hub only when asked for
    disable_dropout: bool = True  # DPO convention (TRL's too): dropout off in policy and reference
    lora: LoraConfig | None = None  # train a LoRA adapter; the reference is then the base model


class ColumnsConfig(_Strict):
    prompt: str = "prompt"  # column holding the prompt (absent = implicit prompt)
    chosen: str = "chosen"  # column holding the preferred response
    rejected: str = "rejected"  # column holding the dispreferred response
    id: str = "id"  # optional row id column
    text: str = "text"  # SFT rows: the whole text (or use prompt + completion)
    completion: str = "completion"  # SFT rows: the response to a prompt


class DataConfig(_Strict):
    source: str = (
        "builtin:tiny-prefs"  # jsonl / parquet file, HF save_to_disk dir, HF hub name, or builtin:tiny-prefs
    )
    format: Literal["auto", "jsonl", "parquet", "hf"] = "auto"  # auto = from the path
    split: str = "train"  # split of an HF dataset
    eval_source: str | None = None  # separate eval set; None = hold out eval_fraction of source
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # share of rows held out for eval when no eval_source
    columns: ColumnsConfig = ColumnsConfig()  # column names in the source
    max_length: int = Field(512, gt=1)  # max tokens of prompt + response
    max_prompt_length: int = Field(256, gt=0)  # max prompt tokens (the prompt's end is kept)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)  # stop if more rows than this are quarantined
    quarantine_path: str | None = None  # None = <train.output_dir>/quarantine.jsonl
    max_rows: int | None = Field(None, gt=0)  # read at most this many rows (quick experiments)
    tokenize_workers: int = Field(1, gt=0)  # Ray Data actors that validate and tokenize

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        return self


class LossConfig(_Strict):
    name: str | list[str] = "sigmoid"  # a LOSSES name, or several to combine
    weights: list[float] | None = None  # one weight per name; None = all 1.0
    beta: float = Field(0.1, gt=0)  # KL strength β (DPO eq. 7)
    params: dict[str, float] = {}  # extra loss parameters, e.g. label_smoothing, gamma
    reduction: Literal["sum", "mean"] | None = None  # override the loss's own choice of log-prob reduction
    sft_weight: float = Field(0.0, ge=0)  # RPO-style NLL term on the chosen response

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @model_validator(mode="after")
    def _known_losses(self) -> LossConfig:
        for n in self.names:
            if n not in LOSSES:
                raise ValueError(f"unknown loss {n!r}; allowed: {', '.join(sorted(LOSSES))}")
        if self.weights is not None and len(self.weights) != len(self.names):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.names)} losses")
        allowed = set().union(*(loss_params(n) for n in self.names))
        for p in self.params:
            if p not in allowed:
                raise ValueError(
                    f"unknown loss parameter {p!r} for {self.names}; "
                    f"allowed: {', '.join(sorted(allowed)) or 'none'}"
                )
        return self


class OptimConfig(_Strict):
    name: Literal["adamw", "rmsprop"] = "adamw"  # optimizer (the DPO paper used RMSprop)
    lr: float = Field(5e-6, gt=0)  # peak learning rate
    weight_decay: float = Field(0.0, ge=0)  # decoupled weight decay (AdamW) / L2 (RMSprop)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    eps: float = Field(1e-8, gt=0)  # optimizer epsilon
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0 to lr over these optimizer steps
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warm-up
    max_grad_norm: float | None = Field(1.0, gt=0)  # clip the global gradient norm; None = no clipping


class TrainConfig(_Strict):
    batch_size: int = Field(8, gt=0)  # pairs per optimizer step per worker, before accumulation
    grad_accum_steps: int = Field(1, gt=0)  # micro-batches per optimizer step (batch_size is split)
    epochs: int = Field(1, gt=0)  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; None = epochs × steps per epoch
    seed: int = 0  # seeds torch, python, numpy and data shuffling
    shuffle: bool = True  # shuffle pairs each epoch (seeded)
    log_every: int = Field(1, gt=0)  # log metrics every this many optimizer steps
    eval_every: int | None = Field(None, gt=0)  # evaluate on the eval split every this many steps
    checkpoint_every: int | None = Field(None, gt=0)  # checkpoint every this many steps
    num_to_keep: int | None = Field(2, gt=0)  # checkpoints kept on disk
    output_dir: str = "runs"  # run outputs go to <output_dir>/<run_name>

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"grad_accum_steps ({self.grad_accum_steps})"
            )
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, gt=0)  # Ray Train workers (one process each)
    use_gpu: bool = False  # one GPU per worker
    strategy: Literal["ddp", "fsdp"] = "ddp"  # DDP, or FSDP2 fully_shard per block (gloo on CPU, NCCL on GPU)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on GPUs that have it, else fp32
    cpus_per_worker: float = Field(1.0, gt=0)  # CPUs Ray reserves per worker
    resources_per_worker: dict[str, float] = {}  # extra custom resources per worker
    max_failures: int = Field(0, ge=-1)  # restarts after worker failure (-1 = unlimited)


class TrackingConfig(_Strict):
    enabled: bool = True  # log to MLflow
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "raydpo"  # MLflow experiment name
    log_model: Literal["reference", "artifacts", "none"] = "reference"  # final model: its path as tags,
    #   a copy in the run's artifacts (registrable from runs:/<id>/model), or nothing
    system_metrics_s: float | None = Field(10.0, ge=0)  # rank 0 samples CPU/memory every N s; None/0 = off


METHODS = ("dpo", "sft", "preferred_ft", "reward_model", "ppo", "ppo_gt")


class PPOConfig(_Strict):
    reward_model: str | None = None  # method=ppo: a reward model directory (from method=reward_model)
    reward: str = "vader"  # method=ppo_gt: a ground-truth reward function by name
    rollout_batch_size: int = Field(32, gt=0)  # prompts sampled per PPO iteration per worker
    minibatch_size: int = Field(8, gt=0)  # rollouts per gradient step
    ppo_epochs: int = Field(2, gt=0)  # passes over each rollout batch
    max_new_tokens: int = Field(16, gt=0)  # response length limit
    temperature: float = Field(1.0, gt=0)  # sampling temperature of the rollouts
    kl_coef: float = Field(0.1, ge=0)  # per-token KL penalty β (initial value when adaptive)
    kl_target: float | None = Field(None, gt=0)  # adaptive KL controller target (None = fixed coefficient)
    kl_horizon: int = Field(10000, gt=0)  # adaptive controller horizon, in rollouts
    gamma: float = Field(1.0, gt=0, le=1)  # discount
    lam: float = Field(0.95, ge=0, le=1)  # GAE λ
    clip_range: float = Field(0.2, gt=0)  # PPO ratio clip ε
    clip_range_value: float = Field(0.2, gt=0)  # value clip
    vf_coef: float = Field(0.1, ge=0)  # weight of the value loss
    whiten_advantages: bool = True  # normalize advantages per rollout batch


class RunConfig(_Strict):
    run_name: str = "dpo"  # names the output folder and the MLflow run
    method: Literal[METHODS] = "dpo"  # dpo | sft | preferred_ft | reward_model | ppo | ppo_gt
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    ppo: PPOConfig = PPOConfig()  # method=ppo / ppo_gt only

    @model_validator(mode="after")
    def _method_needs(self) -> RunConfig:
        if self.method == "ppo" and not self.ppo.reward_model:
            raise ValueError("method=ppo needs ppo.reward_model (a directory written by method=reward_model)")
        return self

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("run_name must be a non-empty name without slashes that does not start with '.'")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.run_name


# ----------------------------------------------------------------------------- loading


def _describe(err: ValidationError, where: str) -> str:
    """One line naming the first bad field, its value and what is allowed."""
    e = err.errors()[0]
    path = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key '{path}'"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    extra = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {path}: {msg}{shown}{extra}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value), with the value parsed as YAML (`1e-6`, `[a, b]`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. loss.beta=0.1")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-6" as a string; accept the notation people write.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `key.sub=value` in a nested dict (a copy); the model then validates the key."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {text!r}: '{p}' is not a section")
            node = node[p]
        node[path[-1]] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def build_config(data: dict, where: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, where)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return build_config(data, str(path) if path else "config")


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: the form MLflow params and sweep keys use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

"""Run configuration: one pydantic model per concern, loaded from YAML with `key.sub=value` overrides.

Unknown keys are errors everywhere (`extra="forbid"`): a typo must never pass silently. Every
error names the field path, the bad value and what is allowed (`ConfigError`, exit 2 in the CLI).
`dump_config` writes the resolved config back to YAML; `load_config` of that file gives it again.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from raydpo.errors import ConfigError
from raydpo.redact import redact_mapping


def safe_name(v: str, field: str = "name") -> str:
    """A name that becomes a folder: non-empty, no slashes, not starting with '.', so it cannot escape
    the folder it is put in (run_name, a sweep's or an eval's name)."""
    if not v or any(c in v for c in "/\\") or v.startswith("."):
        raise ValueError(f"{field} must be a non-empty name without slashes that does not start with '.'")
    return v


def _actor_count(v: int | str) -> int | str:
    if isinstance(v, int) and v < 0:
        raise ValueError(
            "must be 0 (no actor: this process does the work), a positive number of actors, or 'auto'"
        )
    return v


# A number of Ray Data actors for a stage (data.tokenize_workers, train.reference_workers, an eval's
# workers): 0 runs the stage in the calling process, `auto` lets the stage decide by its size.
Actors = Annotated[int | Literal["auto"], AfterValidator(_actor_count)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    r: int = Field(16, gt=0)  # adapter rank
    alpha: float = Field(32.0, gt=0)  # scaling numerator (lora_alpha)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the adapter input
    target_modules: list[str] | str = "all-linear"  # module names (or peft's "all-linear")


class ModelConfig(_Strict):
    policy: str = (
        "builtin:tiny-llama"  # HF hub name, local HF directory, builtin:tiny-llama / -gpt2 / -qwen (ChatML)
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
    tokenize_workers: Actors = "auto"  # Ray Data actors that validate and tokenize; 0 = in the driver
    #   process, no actor (small sources: starting an actor that loads the tokenizer costs seconds);
    #   auto = 0 for JSON-lines files up to 16 MiB and built-in sets up to 256 rows that are not
    #   streamed, else 1 (data/pipeline.py)
    streaming: Literal["auto", "on", "off"] = "auto"  # on: tokenized rows go to parquet in the run dir and
    #   stream from there, each worker reading only its shard (Ray Train's split; 1x8 = 2x4 statistically,
    #   not exactly); off: held in Ray's object store, every worker reads every row and keeps its slice of
    #   each global batch (1x8 = 2x4 exactly); auto = on for local files over 1 GiB (data/pipeline.py)

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
        from raydpo.losses import LOSSES, loss_params  # imports torch: here, not when the CLI starts

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
    skip_nonfinite: bool = False  # skip (and count) a batch whose loss or gradient is NaN/inf; False = stop
    prefix_sharing: bool = False  # pair methods: one [prompt; chosen; rejected] row per pair where the model
    #   supports it (ops.logprobs.supports_shared_prefix), else two rows, said once. Off by default: each
    #   log-prob equals the two-row value within 1e-5, but AdamW's first update amplifies that rounding
    #   (TRL-parity loss after one step: 4e-6 apart instead of 5e-7)
    packing: bool = False  # with prefix_sharing: several pairs per row, each with its own positions and a
    #   block-diagonal mask (data.tokenize.collate_shared), rows no wider than the longest pair; less
    #   padding for batches of uneven lengths; same log-probs within 1e-5
    response_only_logits: bool = True  # run the LM head on scored positions only, in chunks
    group_by_length: bool = False  # batches of pairs of similar length (less padding): each window of 64
    #   global batches of the epoch's seeded order is sorted by length, cut, and its batches shuffled
    precompute_reference: bool = False  # score the data with the reference once, before training, cached
    #   under <output_dir>/.reference-cache (engine/reference.py); workers then hold only the policy
    reference_workers: Actors = "auto"  # Ray Data actors that score the reference (precompute_reference);
    #   0 = in the driver process (a materialized dataset; a streamed one always takes an actor);
    #   auto = 0 when reference weight bytes × tokens to score is at most 1e11, else 1
    output_dir: str = "runs"  # run outputs go to <output_dir>/<run_name>
    storage_path: str | None = None  # checkpoints and the final model go to <storage_path>/<run_name>: a URI
    #   every node reaches (s3://bucket/prefix; credentials and AWS_ENDPOINT_URL from the environment) or a
    #   shared folder; a run started again anywhere resumes from there. None = output_dir. The run's own
    #   records (config.yaml, metric spool, quarantine, a copy of the final model) stay in output_dir

    @field_validator("output_dir")
    @classmethod
    def _local_output_dir(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"a folder, not a URI: put {v} in train.storage_path")
        return v

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"grad_accum_steps ({self.grad_accum_steps})"
            )
        if self.packing and not self.prefix_sharing:
            raise ValueError("packing packs prefix-sharing rows: set train.prefix_sharing=true as well")
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, gt=0)  # Ray Train workers (one process each)
    use_gpu: bool = False  # one GPU per worker
    strategy: Literal["ddp", "fsdp"] = "ddp"  # DDP, or FSDP2 fully_shard per block (gloo on CPU, NCCL on GPU)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on GPUs that have it, else fp32
    cpus_per_worker: float | None = Field(None, gt=0)  # CPUs (and torch threads) per worker; None = on a
    #   local Ray an equal share of this machine's CPUs, on a cluster or in a sweep's trials 1
    resources_per_worker: dict[str, float] = {}  # extra custom resources per worker
    max_failures: int = Field(0, ge=-1)  # restarts after worker failure (-1 = unlimited)


class TrackingConfig(_Strict):
    enabled: bool = True  # log to MLflow
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "raydpo"  # MLflow experiment name
    log_model: Literal["reference", "artifacts", "none"] = "reference"  # final model: its path as tags,
    #   a copy in the run's artifacts (registrable from runs:/<id>/model), or nothing
    system_metrics_s: float | None = Field(10.0, ge=0)  # rank 0 samples CPU/memory every N s; None/0 = off


METHODS = ("dpo", "sft", "preferred_ft", "reward_model", "ppo", "ppo_gt", "unlikelihood")


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


class UnlikelihoodConfig(_Strict):
    alpha: float = Field(1.0, ge=0)  # weight α of the −log(1 − π) term on the rejected tokens


class CheckpointEvalConfig(_Strict):
    every_steps: int | None = Field(None, gt=0)  # sample and judge the run's checkpoints every N steps (and
    #   the last) after training: KL, reward and win rates logged as checkpoint/* at each step; None = off.
    #   Needs train.checkpoint_every dividing N (unset: N); every checkpoint is then kept (train.num_to_keep
    #   does not apply)
    config: str | None = None  # an eval file (`raydpo eval` format): its prompts, reference, judge, reward,
    #   seed, n, max_new_tokens, first temperature, and its baselines as the opponents of the win rates


class RunConfig(_Strict):
    run_name: str = "dpo"  # names the output folder and the MLflow run
    method: Literal[METHODS] = "dpo"  # dpo | sft | preferred_ft | reward_model | ppo | ppo_gt | unlikelihood
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = Field(default_factory=LossConfig)  # a factory: checking loss names imports torch
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    ppo: PPOConfig = PPOConfig()  # method=ppo / ppo_gt only
    unlikelihood: UnlikelihoodConfig = UnlikelihoodConfig()  # method=unlikelihood only
    eval: CheckpointEvalConfig = CheckpointEvalConfig()  # evaluation of checkpoints along training

    @model_validator(mode="after")
    def _method_needs(self) -> RunConfig:
        if self.method == "ppo" and not self.ppo.reward_model:
            raise ValueError("method=ppo needs ppo.reward_model (a directory written by method=reward_model)")
        return self

    @model_validator(mode="after")
    def _checkpoints_to_evaluate(self) -> RunConfig:
        every, ckpt = self.eval.every_steps, self.train.checkpoint_every
        if every is None:
            return self
        if not self.eval.config:
            raise ValueError("eval.every_steps needs eval.config (an eval file: prompts, reference, judge)")
        if ckpt is None:  # checkpoint exactly where the evaluation needs one
            self.train.checkpoint_every = every
        elif every % ckpt:
            raise ValueError(f"eval.every_steps ({every}) must be a multiple of train.checkpoint_every "
                             f"({ckpt})")  # fmt: skip
        return self

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return safe_name(v, "run_name")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.run_name

    @property
    def run_location(self) -> str:
        """Where the run's checkpoints live: <train.storage_path>/<run_name>, else the run directory.
        It names the run in MLflow, so the run started again from any machine finds its MLflow run."""
        if self.train.storage_path:
            return f"{self.train.storage_path.rstrip('/')}/{self.run_name}"
        return str(self.run_dir.resolve())


# ----------------------------------------------------------------------------- loading


def _describe(err: ValidationError, where: str, model: type[BaseModel] = RunConfig) -> str:
    """One line naming the first bad field, its value and what is allowed. An unknown key gets the
    closest known key of its section (`did you mean ...?`), or the section's keys when none is close.
    `model` is the class that was validated (a different error title is looked up among the strict models)."""
    e = err.errors()[0]
    path = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key '{path}'{_key_hint(err, e['loc'], model)}"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    extra = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {path}: {msg}{shown}{extra}"


def _key_hint(err: ValidationError, loc: tuple, model: type[BaseModel]) -> str:
    """`; did you mean 'optim.lr'?`, `; allowed in optim: ...`, or "" when the section is not a model."""
    cls = model if err.title == model.__name__ else _strict_model(err.title)
    section = _section_model(cls, loc) if cls is not None else None
    if section is None:
        return ""
    keys = list(section.model_fields)
    prefix = ".".join(str(p) for p in loc[:-1])
    by_lower = {k.lower(): k for k in keys}
    close = difflib.get_close_matches(str(loc[-1]).lower(), list(by_lower), n=1)
    if close:
        return f"; did you mean '{prefix + '.' if prefix else ''}{by_lower[close[0]]}'?"
    shown = ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
    return f"; allowed {'in ' + prefix if prefix else 'at the top level'}: {shown}"


def _strict_model(name: str) -> type[BaseModel] | None:
    """The one strict config model (this module's, the sweep's, the eval's) of that class name."""
    found, todo = [], [_Strict]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__ == name:
            found.append(cls)
    return found[0] if len(found) == 1 else None


def _members(tp: Any, tag: str | None = None) -> list[tuple[Any, str | None]]:
    """(type, union tag) for each member of a type: Annotated, Optional and unions unwrapped."""
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *meta = get_args(tp)
        tags = [m.tag for m in meta if isinstance(m, Tag)]
        return _members(inner, tags[0] if tags else tag)
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [(tp, tag)]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _section_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model whose keys `loc[-1]` was checked against: walk `loc[:-1]` through model fields, dict
    values, list items and union tags. None when the path does not resolve to one model."""
    tp: Any = model
    for part in loc[:-1]:
        members = _members(tp)
        tagged = [t for t, tag in members if len(members) > 1 and part in (tag, getattr(t, "__name__", None))]
        if tagged:  # a union member's tag (or class name) in the loc picks that member
            tp = tagged[0]
            continue
        for t, _ in members:
            args = get_args(t)
            if _is_model(t) and part in t.model_fields:
                tp = t.model_fields[part].annotation
                break
            if get_origin(t) is dict and isinstance(part, str) and len(args) == 2:
                tp = args[1]
                break
            if get_origin(t) in (list, set, frozenset) and isinstance(part, int) and args:
                tp = args[0]
                break
        else:
            return None
    models = [t for t, _ in _members(tp) if _is_model(t)]
    return models[0] if len(models) == 1 else None


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


def build_config(data: dict, where: str = "config", overrides: Sequence[str] = ()) -> RunConfig:
    """Validate `data` (from `where`, e.g. a file) with the `key.sub=value` overrides applied on top.

    An error is blamed on the override that set the failing field (or a section above it), or, for a
    section-level check the file alone passes, on the override(s) that changed that section; any other
    on `where`. Overrides already applied to `data` may be passed again (applying them is idempotent)."""
    overrides = list(overrides)
    try:
        return RunConfig.model_validate(apply_overrides(data, overrides))
    except ValidationError as e:
        raise ConfigError(_describe(e, _culprit(e, data, overrides, where))) from None


def _culprit(err: ValidationError, data: dict, overrides: list[str], where: str) -> str:
    """`override a.b=1` (or `overrides a=1 b=2`) when the overrides caused the first error, else `where`."""
    loc = tuple(str(p) for p in err.errors()[0]["loc"])
    keyed = [(text, tuple(parse_override(text)[0])) for text in overrides]
    setting = [text for text, key in keyed if loc[: len(key)] == key]
    if setting:  # the last one wins: it is the value that was validated
        return f"override {setting[-1]}"
    inside = [text for text, key in keyed if key[: len(loc)] == loc]
    if not inside or _fails_at(data, loc):
        return where
    alone = [text for text in inside if _fails_at(data, loc, [text])]
    blamed = alone or inside
    return f"override {blamed[0]}" if len(blamed) == 1 else f"overrides {' '.join(blamed)}"


def _fails_at(data: dict, loc: tuple[str, ...], overrides: list[str] = ()) -> bool:
    try:
        RunConfig.model_validate(apply_overrides(data, list(overrides)))
    except ConfigError:  # this override alone does not apply: not the one to blame
        return False
    except ValidationError as e:
        return any(tuple(str(p) for p in x["loc"]) == loc for x in e.errors())
    return False


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    data = read_yaml(path) if path else {}
    return build_config(data, str(path) if path else "config", overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the config as YAML, secrets redacted (`redact_mapping`: a tracking URI's password and
    secret environment values become `***`); without secrets `load_config` of it gives `cfg` again."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(redact_mapping(config_to_dict(cfg)), sort_keys=False))


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

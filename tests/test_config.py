"""Configs: defaults, YAML + overrides, strictness, one-line errors, round trip."""

from typing import Annotated

import pytest
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError

from raydpo.config import (
    LoraConfig,
    RunConfig,
    _describe,
    _section_model,
    _Strict,
    apply_overrides,
    build_config,
    dump_config,
    flatten,
    load_config,
    parse_override,
)
from raydpo.errors import ConfigError


def test_defaults_validate():
    cfg = RunConfig()
    assert cfg.loss.names == ["sigmoid"] and cfg.loss.beta == 0.1
    assert cfg.run_dir.name == "dpo"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_name: a\nloss:\n  name: ipo\n  beta: 0.3\ntrain:\n  batch_size: 4\n")
    cfg = load_config(
        p, ["loss.beta=0.5", "optim.lr=1e-6", "loss.params={label_smoothing: 0.1}", "loss.name=sigmoid"]
    )
    assert cfg.run_name == "a" and cfg.loss.beta == 0.5 and cfg.optim.lr == 1e-6
    assert cfg.loss.name == "sigmoid" and cfg.loss.params == {"label_smoothing": 0.1}
    assert cfg.train.batch_size == 4


@pytest.mark.parametrize(
    "override,needle",
    [
        ("loss.beat=0.1", "unknown key 'loss.beat'"),
        ("trian.batch_size=4", "unknown key 'trian'"),
        ("train.batch_size=four", "train.batch_size"),
        ("loss.name=sigmoidd", "unknown loss 'sigmoidd'"),
        ("loss.beta=-1", "loss.beta"),
        ("optim.name=sgd", "optim.name"),
        ("loss.params={gamma: 1.0}", "unknown loss parameter 'gamma'"),
        ("data.max_prompt_length=600", "max_prompt_length (600) must be below max_length (512)"),
        ("train.grad_accum_steps=3", "multiple of grad_accum_steps"),
        ("run_name=a/b", "run_name"),
    ],
)
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_wrong_type_shows_value_and_allowed():
    with pytest.raises(ConfigError, match=r"optim\.name: .*'adamw' or 'rmsprop'.*got 'sgd'"):
        load_config(None, ["optim.name=sgd"])


def test_unknown_loss_lists_allowed():
    with pytest.raises(ConfigError, match="allowed: .*hinge.*ipo.*sigmoid"):
        build_config({"loss": {"name": ["sigmoid", "nope"]}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["loss.name=[sigmoid, hinge]", "loss.weights=[1.0, 0.5]", "model.lora.r=8"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg
    assert again.model.lora.r == 8 and again.loss.names == ["sigmoid", "hinge"]


def test_override_parsing():
    assert parse_override("a.b=1e-6") == (["a", "b"], 1e-6)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=text") == (["a"], "text")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"run_name": "x"}, ["run_name.sub=1"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_shipped_configs_validate():
    from pathlib import Path

    paths = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))
    assert len(paths) >= 6
    for p in paths:
        load_config(p)


def test_ppo_needs_a_reward_model():
    with pytest.raises(ConfigError, match="method=ppo needs ppo.reward_model"):
        load_config(None, ["method=ppo"])
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=rlhf"])


# ----------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1e-3", "override optim.lrr=1e-3: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("trian.batch_size=4", "override trian.batch_size=4: unknown key 'trian'; did you mean 'train'?"),
        (
            "model.lora.rr=4",
            "override model.lora.rr=4: unknown key 'model.lora.rr'; did you mean 'model.lora.r'?",
        ),
        ("optim.LR=1", "override optim.LR=1: unknown key 'optim.LR'; did you mean 'optim.lr'?"),
        (
            "optim.zzz=1",
            "override optim.zzz=1: unknown key 'optim.zzz'; allowed in optim: name, lr, weight_decay, betas, "
            "eps, warmup_steps, schedule, max_grad_norm",
        ),
        (
            "qqqqq=1",
            "override qqqqq=1: unknown key 'qqqqq'; allowed at the top level: run_name, method, model, data, "
            "loss, optim, train, scaling, tracking, ppo, unlikelihood, eval",
        ),
    ],
)
def test_unknown_key_suggests_or_lists(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_long_sections_list_a_few_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.zzzz=1"])
    msg = str(e.value)
    assert msg.startswith(
        "override ppo.zzzz=1: unknown key 'ppo.zzzz'; allowed in ppo: reward_model, reward, "
    )
    assert msg.endswith(f"(+{len(RunConfig.model_fields['ppo'].annotation.model_fields) - 12} more)")


def test_yaml_typo_blames_the_file_with_a_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["optim.lr=1e-3"])  # a correct override does not take the blame
    assert str(e.value) == f"{p}: unknown key 'optim.lrr'; did you mean 'optim.lr'?"


def test_override_typo_blames_the_override_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_name: a\noptim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.epochs=2", "optim.lrr=1e-3"])
    assert str(e.value) == "override optim.lrr=1e-3: unknown key 'optim.lrr'; did you mean 'optim.lr'?"
    with pytest.raises(ConfigError) as e:  # the last override of a field is the value validated
        load_config(p, ["train.batch_size=8", "train.batch_size=x"])
    assert str(e.value).startswith("override train.batch_size=x: train.batch_size: ")
    with pytest.raises(ConfigError) as e:  # an override that replaces a whole section
        load_config(p, ["optim={lrr: 1}"])
    assert str(e.value) == "override optim={lrr: 1}: unknown key 'optim.lrr'; did you mean 'optim.lr'?"


def test_section_checks_blame_the_override_that_broke_them(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  max_length: 64\n  max_prompt_length: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["data.max_prompt_length=100", "train.epochs=2"])
    assert str(e.value) == (
        "override data.max_prompt_length=100: data: max_prompt_length (100) must be below max_length (64)"
    )
    with pytest.raises(ConfigError) as e:  # top-level check: only the override that causes it
        load_config(p, ["train.epochs=2", "method=ppo"])
    assert str(e.value).startswith("override method=ppo: (top level): method=ppo needs ppo.reward_model")
    p.write_text("data:\n  max_prompt_length: 600\n")
    with pytest.raises(ConfigError) as e:  # already broken in the file: the file is blamed
        load_config(p, ["data.max_length=100"])
    assert str(e.value).startswith(f"{p}: data: max_prompt_length (600) must be below")


def test_build_config_blames_overrides_given_to_it():
    """`raydpo data validate` builds `data.*` overrides; applied already or not, the typo is theirs."""
    ov = ["data.format=jsonl", "data.max_lenght=5"]
    for data in ({"data": {"source": "x.jsonl"}}, apply_overrides({"data": {"source": "x.jsonl"}}, ov)):
        with pytest.raises(ConfigError) as e:
            build_config(data, "data validate", ov)
        assert str(e.value) == (
            "override data.max_lenght=5: unknown key 'data.max_lenght'; did you mean 'data.max_length'?"
        )
    with pytest.raises(ConfigError, match=r"^data validate: unknown key 'data\.sorce'"):
        build_config({"data": {"sorce": "x"}}, "data validate", ["data.format=jsonl"])


class _Dim(_Strict):
    grid: list | None = None
    choice: list | None = None


class _Pick(_Strict):
    best_of_n: int
    reward_model: str


class _SweepLike(_Strict):
    """A sweep/eval-style model: `_describe` is called without it (default RunConfig) and finds it by name."""

    search: dict[str, _Dim] = {}
    weights: dict[str, float] = {}
    policies: dict[
        str,
        Annotated[
            Annotated[str, Tag("path")] | Annotated[_Pick, Tag("pick")],
            Discriminator(lambda v: "pick" if isinstance(v, dict) else "path"),
        ],
    ] = {}
    scheduler: _Dim | None = None


@pytest.mark.parametrize(
    "data,hint",
    [
        ({"serach": {}}, "unknown key 'serach'; did you mean 'search'?"),
        (
            {"search": {"loss.beta": {"gird": [1]}}},
            "unknown key 'search.loss.beta.gird'; did you mean 'search.loss.beta.grid'?",
        ),
        ({"scheduler": {"choise": [1]}}, "unknown key 'scheduler.choise'; did you mean 'scheduler.choice'?"),
        (
            {"policies": {"a": {"best_of_n": 2, "reward_model": "r", "rewrd_model": "r"}}},
            "unknown key 'policies.a.pick.rewrd_model'; did you mean 'policies.a.pick.reward_model'?",
        ),
    ],
)
def test_other_models_get_their_own_suggestions(data, hint):
    with pytest.raises(ValidationError) as e:
        _SweepLike.model_validate(data)
    assert _describe(e.value, "s.yaml") == f"s.yaml: {hint}"
    assert _describe(e.value, "s.yaml", _SweepLike) == f"s.yaml: {hint}"


def test_unresolvable_paths_get_no_suggestion():
    class Foreign(BaseModel):  # not a strict config model: nothing to look its keys up in
        model_config = ConfigDict(extra="forbid")
        train: int = 0

    with pytest.raises(ValidationError) as e:
        Foreign.model_validate({"trian": 1})
    assert _describe(e.value, "f.yaml") == "f.yaml: unknown key 'trian'"
    assert _section_model(_SweepLike, ("weights", "a", "x")) is None  # dict fields take any key
    assert _section_model(RunConfig, ("scaling", "resources_per_worker", "gpu")) is None
    assert _section_model(RunConfig, ("nope", "x")) is None
    assert _section_model(RunConfig, ("model", "lora", "rr")) is LoraConfig

"""Configs: defaults, YAML + overrides, strictness, one-line errors, round trip."""

import pytest

from raydpo.config import (
    RunConfig,
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

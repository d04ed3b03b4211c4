"""Config validation: typos name the keys that exist; overrides are typed; every shipped example validates."""

from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from posttrain.config import (
    CONFIGS,
    DPOSection,
    GRPOSection,
    ModelConfig,
    RolloutSection,
    StageSpec,
    SuiteSpec,
    TrainConfig,
    load_config,
)
from posttrain.errors import ConfigError

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert type(cfg) is CONFIGS[cfg.method]
    # runs/: written by a script before use; ../shared: the public datasets beside the repo, not needed by tests
    if not str(cfg.data.train).startswith(("runs/", "../")):
        assert (path.parent.parent / cfg.data.train).is_file(), cfg.data.train


SUITE_FILES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples", "evals").glob("*.yaml"))


@pytest.mark.parametrize("path", SUITE_FILES, ids=[p.name for p in SUITE_FILES])
def test_every_example_suites_file_validates(path):
    from posttrain.config import load_suites
    from posttrain.eval.suites import SUITE_OPTIONS

    cfg = load_suites(path)
    for spec in cfg.evals.values():
        assert set(spec.options) <= SUITE_OPTIONS[spec.kind], spec.options


def test_examples_exist():
    assert len(EXAMPLES) >= 3


def test_mistyped_key_names_the_keys_that_exist():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x.jsonl", "train.lrr=1e-4"], method="sft")
    msg = str(err.value)
    assert "train.lrr: unknown key. did you mean 'train.lr'?" in msg
    assert "Keys here:" in msg and "micro_batch_size" in msg


def test_unknown_section_and_bad_values():
    with pytest.raises(ConfigError, match="trian: unknown key. did you mean 'train'"):
        load_config(None, ["data.train=x.jsonl", "trian.lr=1"], method="sft")
    with pytest.raises(ConfigError, match="data.overlong"):
        load_config(None, ["data.train=x.jsonl", "data.overlong=sometimes"], method="sft")
    with pytest.raises(ConfigError, match="data: required, but not given"):
        load_config(None, [], method="sft")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.lr"], method="sft")


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(None, ["data.train=t.jsonl", "train.lr=1e-4", "train.max_steps=3",
                             "lora.target_modules=[q_proj,v_proj]", "train.max_grad_norm=null"], method="sft")
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train.max_grad_norm is None
    (tmp_path / "c.yaml").write_text("data:\n  train: a.jsonl\ntrain:\n  lr: 0.1\n")
    assert load_config(tmp_path / "c.yaml", ["train.lr=0.2"]).train.lr == 0.2


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def _literal(model, name):
    """The values of a field's Literal (of ``Literal[...] | None``, the Literal's)."""
    ann = model.model_fields[name].annotation
    args = get_args(ann)
    if get_origin(ann) is not Literal:
        args = tuple(v for arg in args if get_origin(arg) is Literal for v in get_args(arg))
    return set(args)


def test_variant_tables_agree():
    """Every config Literal that names the entries of a table offers exactly that table's keys."""
    from posttrain.engine.loop import OPTIMIZERS
    from posttrain.engine.trackers import TRACKERS
    from posttrain.eval.suites import SUITES
    from posttrain.losses import PREFERENCE_LOSSES
    from posttrain.losses.advantages import ADVANTAGES, GROUP_FILTERS, STD_NORMS, TRUNCATED
    from posttrain.losses.offpolicy import IS_CORRECTIONS
    from posttrain.losses.policy import KL_ESTIMATORS, POLICY_LOSSES
    from posttrain.losses.reduce import AGGREGATIONS
    from posttrain.models.numerics import DTYPES
    from posttrain.rollout.engines import ENGINES

    assert _literal(DPOSection, "loss") == set(PREFERENCE_LOSSES)
    assert _literal(GRPOSection, "aggregation") == set(AGGREGATIONS)
    for key, table in [("advantage", ADVANTAGES), ("std", STD_NORMS), ("policy_loss", POLICY_LOSSES),
                       ("kl_estimator", KL_ESTIMATORS), ("dynamic_sampling", GROUP_FILTERS), ("truncated", TRUNCATED)]:
        assert _literal(GRPOSection, key) == set(table), key
    assert _literal(RolloutSection, "engine") == set(ENGINES)
    assert _literal(RolloutSection, "is_correction") == set(IS_CORRECTIONS)
    assert _literal(SuiteSpec, "kind") == set(SUITES)
    assert _literal(TrainConfig, "optimizer") == set(OPTIMIZERS) | {"auto"}
    # report_to: "auto" or a list of the tracker table's names
    auto, names = get_args(TrainConfig.model_fields["report_to"].annotation)
    assert get_args(auto) == ("auto",) and set(get_args(get_args(names)[0])) == set(TRACKERS)
    assert _literal(ModelConfig, "dtype") == set(DTYPES)
    assert _literal(StageSpec, "train") == set(CONFIGS)
    for method, schema in CONFIGS.items():
        assert _literal(schema, "method") == {method}

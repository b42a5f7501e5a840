"""conf/ composes and validates in every option; params.yaml is generated from it; bad configs
fail with every problem named at once."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import HydraException

from pipeline.core.config import ConfigError, PipelineConfig, from_mapping
from pipeline.params import CONF_DIR, compose

REPO = Path(__file__).resolve().parents[1]
# data/base.yaml and prompt/base.yaml are the parents every option of their group lists in its defaults, not a choice of its own.
ABSTRACT = {("data", "base"), ("prompt", "base")}
ENCODER_MODEL = ("model", "minilm_cls")  # placed under encoder.model by conf/encoder/minilm.yaml
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml") if (p.parent.name, p.stem) not in ABSTRACT)


def overrides_for(group: str, option: str) -> list[str]:
    if group == "experiment":
        return [f"+experiment={option}"]
    extra = ["data.path=x"] if (group, option) in (("data", "local"), ("data", "hub")) else []
    if ENCODER_MODEL == (group, option):  # the encoder arm's model: the default config holds it under encoder.model
        return []
    return [f"{group}={option}", *extra]


def assert_contains(full: dict, part: dict, where: str = "", overridden: frozenset[str] = frozenset()) -> None:
    """Every value ``part`` sets (except ``???`` placeholders and overridden keys) is in ``full``."""
    for key, value in part.items():
        if key == "defaults" or value == "???" or f"{where}{key}" in overridden:
            continue
        if isinstance(value, str) and value.startswith("${"):  # an interpolation: checked below, resolved
            continue
        assert key in full, f"{where}{key} missing from the composition"
        if isinstance(value, dict) and value:
            assert_contains(full[key], value, f"{where}{key}.", overridden)
        else:
            assert full[key] == value, f"{where}{key}: {full[key]!r} != {value!r}"


def test_groups_found() -> None:
    assert {g for g, _ in OPTIONS} == {"align", "data", "encoder", "eval", "experiment", "export", "finetune", "model",
                                       "prompt", "safety", "trainer"}
    assert len(OPTIONS) >= 12


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = overrides_for(group, option)
    raw = compose(overrides)
    cfg = from_mapping(raw, source=f"{group}={option}")
    assert isinstance(cfg, PipelineConfig)
    own = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text(encoding="utf-8"))
    overridden = frozenset(o.split("=")[0] for o in overrides[1:])
    where = raw["encoder"]["model"] if (group, option) == ENCODER_MODEL else raw if group == "experiment" else raw[group]
    assert_contains(where, own, "" if group == "experiment" else f"{group}.", overridden)


def test_encoder_arm_follows_the_trainer_budget_unless_set() -> None:
    raw = compose(["trainer.max_steps=7", "trainer.batch_size=3"])
    enc = from_mapping(raw).encoder
    assert enc.enabled and enc.model.kind == "sequence_classification" and enc.finetune.method == "full"
    assert (enc.trainer.max_steps, enc.trainer.batch_size) == (7, 3)  # the LLM's budget...
    assert enc.trainer.lr == 1.0e-4 != raw["trainer"]["lr"]  # ...but its own learning rate
    assert raw["encoder"]["model"] == compose(["model=minilm_cls", "finetune=full", "eval.models=[tuned]"])["model"]
    assert from_mapping(compose(["encoder=none"])).encoder.enabled is False
    with pytest.raises(ConfigError) as err:
        from_mapping(compose(["encoder.model.kind=causal_lm", "encoder.finetune.method=lora", "encoder.max_length=2"]))
    assert {"encoder.model.kind", "encoder.finetune.method", "encoder.max_length"} <= {
        p.split(":")[0] for p in err.value.problems}


def test_data_base_alone_is_incomplete() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(compose(["data=base"]))
    assert info.value.problems == ["data.source: missing"]


def test_smoke_experiment_shrinks_the_model() -> None:
    cfg = from_mapping(compose(["+experiment=smoke"]))
    assert cfg.model.init == "random"
    assert cfg.model.config_overrides["num_hidden_layers"] == 2
    assert cfg.trainer.max_steps == 6


def test_committed_params_yaml_equals_the_composition() -> None:
    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert committed == compose([])


def run_check(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.params", "--check"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_params_check_passes_on_the_repo() -> None:
    result = run_check(REPO)
    assert result.returncode == 0, result.stderr


def test_params_check_fails_on_a_modified_copy(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["trainer"]["lr"] = 0.123
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    result = run_check(tmp_path)  # conf/ is found next to the installed package, not in cwd
    assert result.returncode == 1
    assert "params.yaml is out of date with conf/" in result.stderr


def test_three_problems_are_reported_together() -> None:
    raw = copy.deepcopy(compose([]))
    raw["trainer"]["lr"] = -1.0
    raw["prompt"]["kind"] = "nope"
    raw["data"]["source"] = "local"
    raw["data"]["path"] = None
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    assert sorted(info.value.problems) == sorted([
        "trainer.lr: must be > 0 and finite (got -1.0)",
        "prompt.kind: 'nope' is not one of chat, jinja",
        "data.path: required when data.source=local",
    ])
    assert str(info.value).startswith("3 problem(s) in config:")


def test_unknown_key_is_named() -> None:
    raw = copy.deepcopy(compose([]))
    raw["trainer"]["learning_rate"] = 1e-4
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    assert len(info.value.problems) == 1
    assert "trainer.learning_rate" in info.value.problems[0]


def test_local_data_without_a_path_is_refused() -> None:
    # local.yaml's `path: ???` merges onto base.yaml's `path: null` and leaves it null
    # (OmegaConf never lets ??? override a value), so the check in DataConfig.problems is what catches it.
    with pytest.raises(ConfigError) as info:
        from_mapping(compose(["data=local"]))
    assert info.value.problems == ["data.path: required when data.source=local"]


def test_unknown_group_option_is_a_hydra_error() -> None:
    with pytest.raises(HydraException, match="nope"):
        compose(["model=nope"])

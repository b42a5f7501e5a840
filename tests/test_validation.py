"""Every config key with a domain is checked before anything heavy runs (RELIABILITY.md, issue 24).

A fuzz-style sweep sets one key of the composed default config to a wrong value, a few
hundred times, and requires a :class:`ConfigError` naming that key on one line, never an
accepted config and never another exception. A handful go through the real CLI too.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.config import ConfigError, DATA_FORMATS, PRECISIONS, from_mapping
from pipeline.params import compose

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")

# Wrong values by domain. Strings a typed field would coerce ("5" for an int) are left out on purpose.
POSITIVE_INT = [0, -1, -5, 1.5, "x", None, [1], {"a": 1}, True]
NONNEG_INT = [-1, -2, -100, 0.5, "x", None, [0]]
POSITIVE_FLOAT = [0, 0.0, -1.0, -1e-9, INF, -INF, NAN, "x", None, [1.0]]
NONNEG_FLOAT = [-1, -0.5, INF, -INF, NAN, "x", None]
UNIT_OPEN = [1, 1.0, 1.5, -0.1, INF, NAN, "x", None]  # [0, 1)
ENUM = ["bogus", "", "CHAT ", 5, None, ["a"], {"a": 1}]
SEED = [-1, 2**32, 2**40, "x", 1.5, None]
NONEMPTY_STR = ["", "   ", None, ["a"]]

TRAINER = {
    "accelerator": ENUM + ["fpga"], "precision": ENUM + ["fp7", "8-true", "bf32"], "devices": POSITIVE_INT,
    "batch_size": POSITIVE_INT, "accumulate_grad_batches": POSITIVE_INT, "max_steps": POSITIVE_INT,
    "max_epochs": [0, -2, -3, 1.5, "x", None], "lr": POSITIVE_FLOAT, "weight_decay": NONNEG_FLOAT,
    "warmup_ratio": UNIT_OPEN, "gradient_clip_val": [-1.0, INF, NAN, "x"], "val_check_interval": POSITIVE_INT,
    "log_every_n_steps": POSITIVE_INT, "num_workers": NONNEG_INT, "batching": ENUM, "pack_length": POSITIVE_INT,
    "gradient_checkpointing": ["maybe", None, 1, [True], "AUTO"], "activation_budget_mb": POSITIVE_INT,
    "micro_batches": POSITIVE_INT,
    "compile": ["maybe", None, [True]], "strategy.name": ENUM + ["deepspeed"], "strategy.sharding": ENUM,
}
BAD: dict[str, list[Any]] = {
    "seed": SEED, "model.init": ENUM, "model.kind": ENUM, "model.name": NONEMPTY_STR, "model.path": NONEMPTY_STR,
    "model.trust_remote_code": ["maybe", None, "yes please"],
    "data.source": ENUM, "data.format": ENUM + ["jsonl", "csv", "alpaca"],  # alpaca: embedded data has no format
    "data.on_error": ENUM, "data.n_per_task": POSITIVE_INT, "data.generator_seed": SEED,
    "data.val_fraction": UNIT_OPEN, "data.test_fraction": UNIT_OPEN + [0, 0.0], "data.max_problems": POSITIVE_INT,
    "data.task_type": ["bogus", "", 5], "data.hub_split": NONEMPTY_STR,
    "data.dedup.exact": ENUM, "data.dedup.near": ENUM, "data.dedup.contamination": ENUM,
    "data.dedup.near_threshold": [0, 0.99, 1, -1, INF, NAN, "x"], "data.dedup.ngram_threshold": [0, 1.5, NAN, INF],
    "data.dedup.shingle": POSITIVE_INT, "data.dedup.ngram": POSITIVE_INT, "data.dedup.num_perm": [0, 8, 63, -1, "x"],
    "prompt.kind": ENUM, "prompt.train_on": ENUM, "prompt.overflow": ENUM, "prompt.k_shot": NONNEG_INT,
    "prompt.eval_k_shot": NONNEG_INT, "prompt.max_length": [7, 0, -1, "x", None], "prompt.shot_seed": SEED,
    "finetune.method": ENUM, "finetune.lora.r": POSITIVE_INT, "finetune.lora.alpha": POSITIVE_INT,
    "finetune.lora.dropout": UNIT_OPEN, "finetune.lora.target_modules": [[], [""], "q_proj", None],
    **{f"trainer.{k}": v for k, v in TRAINER.items()},
    **{f"encoder.trainer.{k}": v for k, v in TRAINER.items() if k not in ("batching", "compile")},
    "encoder.max_length": [7, 0, -1, "x"], "encoder.model.kind": ENUM, "encoder.model.init": ENUM,
    "eval.models": [[], ["bogus"], "tuned", None], "eval.batch_size": POSITIVE_INT,
    "eval.decode_batch_size": POSITIVE_INT, "eval.max_examples": [0, -1, "x", 1.5],
    **{f"eval.max_new_tokens.{t}": [0, -5, -1, 1.5, "x", None] for t in ("classification", "short_answer", "free_text")},
    "eval.max_new_tokens.essay": [10], "eval.bootstrap.n_resamples": POSITIVE_INT, "eval.bootstrap.seed": SEED,
    "eval.length_buckets": [[40, 20], [20, 20], [0, 10], [-5], "x"], "eval.stop_strings": [[""], "x"],
    "eval.task_types.qa": ["essay", "", 5],
    "safety.classifier": [{"fn": "x"}, "os.system", 5], "safety.classifier._target_": ["not a path", "os", "", "a..b"],
    "tracking.experiment": NONEMPTY_STR,
    "trainer.learning_rate": [1e-4], "model.tokenizer": ["x"], "data.bogus": [1],  # unknown keys
}
MIXTURE_BAD: dict[str, list[Any]] = {  # keys of one mixture source (data=mixture)
    "source": ENUM + ["web"], "weight": [0, -1, INF, NAN, "x"], "cap": [0, -3, "x", 1.5],
    "format": ["bogus", "", 5], "task_type": ["bogus", 5], "name": [None, ["a"]],
}


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``a.b.c``, creating (or replacing a null with) mappings on the way."""
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[last] = value


def _cases(n: int, seed: int = 24) -> list[tuple[str, Any]]:
    """``n`` (key, value) pairs from BAD: one wrong value of every key, the rest drawn at random."""
    rng = random.Random(seed)
    first = [(k, rng.choice(values)) for k, values in BAD.items()]
    rest = [(k, v) for k, values in BAD.items() for v in values if (k, v) not in first]
    return first + rng.sample(rest, min(len(rest), n - len(first)))


@pytest.fixture(scope="module")
def default() -> dict[str, Any]:
    return compose([])


@pytest.fixture(scope="module")
def mixture() -> dict[str, Any]:
    raw = compose(["data=mixture"])
    raw["data"]["sources"] = [{"name": "a", "source": "local", "path": "a.jsonl"},
                              {"name": "b", "source": "embedded"}]
    return raw


def _assert_refused(raw: dict[str, Any], key: str, value: Any) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    assert time.perf_counter() - started < 1.0, (key, value)
    problems = info.value.problems
    assert all("\n" not in p for p in problems), problems
    # The key itself, or its parent for a list item (eval.models: ...), starts a problem line.
    assert any(p.startswith(key) for p in problems), (key, value, problems)


def test_defaults_and_every_shipped_value_pass(default: dict[str, Any], mixture: dict[str, Any]) -> None:
    from_mapping(default)
    from_mapping(mixture)
    for name in ("+experiment=smoke", "trainer=fsdp", "trainer=ddp", "trainer=gpu", "encoder=none"):
        from_mapping(compose([name]))
    for key, value in [("trainer.max_epochs", -1), ("trainer.gradient_clip_val", None), ("trainer.gradient_clip_val", 0.0),
                       ("finetune.lora.dropout", 0.0), ("data.val_fraction", 0.0), ("seed", 0), ("seed", 2**32 - 1),
                       ("trainer.precision", "bf16-mixed"), ("trainer.accelerator", "auto")]:
        raw = copy.deepcopy(default)
        _set(raw, key, value)
        from_mapping(raw)


def test_every_listed_key_refuses_every_wrong_value(default: dict[str, Any]) -> None:
    """A few hundred single bad overrides: each one a ConfigError naming its key."""
    cases = _cases(300)
    assert len(cases) == 300 and {k for k, _ in cases} == set(BAD)
    for key, value in cases:
        raw = copy.deepcopy(default)
        _set(raw, key, value)
        _assert_refused(raw, key, value)


def test_every_mixture_source_key_refuses_wrong_values(mixture: dict[str, Any]) -> None:
    for key, values in MIXTURE_BAD.items():
        for value in values:
            raw = copy.deepcopy(mixture)
            raw["data"]["sources"][0][key] = value
            _assert_refused(raw, f"data.sources[0].{key}", value)
    raw = copy.deepcopy(mixture)
    raw["data"]["sources"][1]["format"] = "alpaca"  # an embedded source has no file to read a format from
    _assert_refused(raw, "data.sources[1].format", "alpaca")


def test_all_problems_of_the_issue_are_reported_together(default: dict[str, Any]) -> None:
    raw = copy.deepcopy(default)
    for key, value in [("trainer.lr", INF), ("data.format", "bogus"), ("finetune.lora.r", 0),
                       ("finetune.lora.dropout", 1.5), ("eval.max_new_tokens.free_text", -5),
                       ("trainer.precision", "fp7"), ("trainer.max_epochs", -3), ("trainer.weight_decay", -1),
                       ("trainer.num_workers", -2)]:
        _set(raw, key, value)
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    keys = sorted(p.split(":")[0] for p in info.value.problems)
    assert keys == sorted(["trainer.lr", "data.format", "finetune.lora.r", "finetune.lora.dropout",
                           "eval.max_new_tokens.free_text", "trainer.precision", "trainer.max_epochs",
                           "trainer.weight_decay", "trainer.num_workers"])


def test_the_domains_match_the_libraries_that_read_them() -> None:
    """The lists spelled in config.py (to stay import-light) are what the readers accept."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import (_PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS)

    from pipeline.data.formats import FORMATS

    assert set(PRECISIONS) == set(get_args(_PRECISION_INPUT_STR)) | set(get_args(_PRECISION_INPUT_STR_ALIAS))
    assert DATA_FORMATS == FORMATS


def _cli(params: Path, cwd: Path) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out", "out",
                           "--stats", "stats.json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("key, value", [("trainer.lr", INF), ("data.format", "bogus"), ("finetune.lora.r", 0),
                                        ("trainer.precision", "fp7"), ("trainer.lr", "abc"),
                                        ("data.sources", [{"name": "a", "source": "local", "weight": "w"}])])
def test_the_cli_stops_with_one_line_naming_the_key(tmp_path: Path, default: dict[str, Any], key: str,
                                                     value: Any) -> None:
    raw = copy.deepcopy(default)
    _set(raw, key, value)
    if key == "data.sources":
        raw["data"]["source"] = "mixture"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _cli(tmp_path / "bad.yaml", tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prepare: error:")]
    assert len(errors) == 1, proc.stderr
    # The one error line, then one indented line per problem: the key is named on it.
    problems = [line.strip() for line in proc.stderr.splitlines()[1:] if line.strip()]
    named = key if key != "data.sources" else "data.sources[0].weight"
    assert len(problems) == 1 and problems[0].startswith(named), proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "stats.json").exists()

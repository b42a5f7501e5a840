"""Stage 2, prepare: load raw data, normalize, validate, deduplicate, split, report.

Reads ``data`` and ``seed`` from params.yaml. Writes ``train/val/test.jsonl`` (one
normalized :class:`~pipeline.data.schema.Example` per line) to ``--out`` and a stats
report to ``--stats``. Every dropped row is counted with its reason; invalid raw data
stops the stage with every problem listed as file:line: field, and nothing is written.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import config
from pipeline.data.schema import DataError, Example
from pipeline.files import atomic_dir, write_json, write_jsonl

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The data cannot be split into non-empty train and test sets."""


def load(cfg: config.DataConfig) -> list[Example]:
    """Raw examples from the configured source, normalized and validated."""
    if cfg.source == "embedded":
        from pipeline.data import embedded

        return embedded.generate(cfg.generator_seed, cfg.n_per_task)
    from pipeline.data import formats

    common = dict(format=cfg.format, task=cfg.task, task_type=cfg.task_type, columns=dict(cfg.columns),
                  max_problems=cfg.max_problems)
    if cfg.source == "local":
        return formats.load_file(cfg.path, **common)  # type: ignore[arg-type]
    return formats.load_hub(cfg.path, split=cfg.hub_split, config=cfg.hub_config,  # type: ignore[arg-type]
                            revision=cfg.hub_revision, **common)


def _key(ex: Example) -> tuple[str, ...]:
    """Exact-duplicate key: content after whitespace normalization, ignoring ids."""
    return tuple(" ".join(s.split()) for s in (ex.task, ex.instruction, ex.input, ex.output))


def deduplicate(examples: list[Example]) -> tuple[list[Example], list[dict[str, str]]]:
    """Keep the first of each exact duplicate; return the kept rows and the dropped ones."""
    seen: dict[tuple[str, ...], str] = {}
    kept, dropped = [], []
    for ex in examples:
        key = _key(ex)
        if key in seen:
            dropped.append({"id": ex.id, "reason": "exact_duplicate", "duplicate_of": seen[key]})
        else:
            seen[key] = ex.id
            kept.append(ex)
    return kept, dropped


def split(examples: list[Example], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Example]]:
    """Per-task shuffled split; depends only on (rows, fractions, seed).

    Splitting within each task keeps every task in every split, and a local generator
    seeded with the task name keeps one task's split independent of the others.
    """
    by_task: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for task in sorted(by_task):
        rows = sorted(by_task[task], key=lambda e: e.id)
        random.Random(f"{seed}:{task}").shuffle(rows)
        n_test = max(1, round(len(rows) * test_fraction)) if len(rows) >= 3 else 0
        n_val = max(1, round(len(rows) * val_fraction)) if len(rows) >= 3 and val_fraction > 0 else 0
        out["test"] += rows[:n_test]
        out["val"] += rows[n_test:n_test + n_val]
        out["train"] += rows[n_test + n_val:]
    return out


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    p = np.percentile(values, [50, 90, 99, 100])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "max": float(p[3])}


def stats(loaded: int, splits: dict[str, list[Example]], dropped: list[dict[str, str]]) -> dict[str, Any]:
    """Counts per task and split, drops by reason, and length percentiles in words."""
    counts = {s: dict(sorted(Counter(e.task for e in rows).items())) for s, rows in splits.items()}
    every = [e for rows in splits.values() for e in rows]
    return {
        "loaded": loaded,
        "kept": len(every),
        "dropped": dict(Counter(d["reason"] for d in dropped)),
        "splits": {s: len(rows) for s, rows in splits.items()},
        "per_task": counts,
        "task_types": dict(sorted({e.task: e.task_type for e in every}.items())),
        "length_words": {
            "prompt": _percentiles([len(f"{e.instruction} {e.input}".split()) for e in every]),
            "output": _percentiles([len(e.output.split()) for e in every]),
        },
    }


def run(data_cfg: config.DataConfig, seed: int, out: Path, stats_path: Path) -> dict[str, Any]:
    """Prepare the dataset into ``out`` (atomically) and write the stats report."""
    examples = load(data_cfg)
    kept, dropped = deduplicate(examples) if data_cfg.dedup else (examples, [])
    splits = split(kept, data_cfg.val_fraction, data_cfg.test_fraction, seed)
    if not splits["train"] or not splits["test"]:
        n_tasks = len({e.task for e in kept})
        raise SplitError(
            f"no task has >= 3 examples ({n_tasks} tasks, {len(kept)} examples), so nothing is left for val/test; "
            "set data.task=NAME to treat the file as one task, or add examples")
    report = stats(len(examples), splits, dropped)
    with atomic_dir(out) as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", (e.to_dict() for e in rows))
        write_jsonl(tmp / "dropped.jsonl", dropped)
    write_json(stats_path, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="directory for train/val/test.jsonl")
    parser.add_argument("--stats", type=Path, required=True, help="stats JSON to write")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    try:
        report = run(cfg.data, cfg.seed, args.out, args.stats)
    except (DataError, SplitError) as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 1
    print(f"prepare: {report['kept']} examples ({report['splits']}), dropped {report['dropped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

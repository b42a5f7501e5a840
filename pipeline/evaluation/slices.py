"""Bias slices: every metric of every model on each slice of the test set, and the largest gap.

A slice is a key naming a field of the prepared example (``task``, ``source``, any other
field), a metadata column (``meta.<column>``) or a derived value (``input_length``: the
prompt's word count, bucketed by ``eval.length_buckets``). Each slice value is scored
with the same code as the whole test set (:func:`pipeline.evaluation.scoring.score_model`), with
its own bootstrap intervals, so a gap between slices is read with its uncertainty.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.evaluation import scoring
from pipeline.core.errors import SliceError


def bucket(words: int, edges: Sequence[int]) -> str:
    """The length bucket ``words`` falls in: ``<=20``, ``21-40``, ``>40`` for edges [20, 40]."""
    low = 0
    for edge in edges:
        if words <= edge:
            return f"<={edge}" if low == 0 else f"{low + 1}-{edge}"
        low = edge
    return f">{low}"


def slice_value(example: Mapping[str, Any], key: str, edges: Sequence[int]) -> str:
    """The value of slice ``key`` for one prepared example (as a string)."""
    if key == "input_length":
        return bucket(len(f"{example.get('instruction', '')} {example.get('input', '')}".split()), edges)
    if key.startswith("meta."):
        meta = example.get("meta") or {}
        column = key[len("meta."):]
        if column not in meta:
            raise SliceError(f"eval.slices: example {example['id']!r} has no meta column {column!r}")
        return str(meta[column])
    if key not in example:
        raise SliceError(f"eval.slices: {key!r} is not a field of the test examples "
                         f"(fields: {', '.join(sorted(example))}; or input_length, meta.<column>)")
    return str(example[key])


@dataclass
class SliceTable:
    """``rows``: one per (slice key, value, model, task or overall, metric); ``gaps``: per key and model."""

    rows: list[dict[str, Any]]
    gaps: list[dict[str, Any]]

    def largest_gap(self) -> dict[str, Any] | None:
        return max(self.gaps, key=lambda g: g["gap"], default=None)


def score_slices(keys: Sequence[str], values: Sequence[Mapping[str, str]],
                 outputs: Mapping[str, Mapping[str, scoring.TaskOutputs]], task_of: Sequence[str],
                 n_resamples: int, seed: int) -> SliceTable:
    """Score every model on every slice value; ``values[i][key]`` is example ``i``'s value.

    ``outputs[model][task]`` holds the task's examples in test order and ``task_of[i]``
    each example's task, so example ``i`` is the ``k``-th row of its task's outputs.
    """
    position, seen = [], {}  # example i -> its row within its task
    for t in task_of:
        position.append(seen.get(t, 0))
        seen[t] = position[-1] + 1
    rows, gaps = [], []
    for key in keys:
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(v[key], []).append(i)
        for model, per_task in outputs.items():
            overall = {}
            for value, members in sorted(groups.items()):
                subset = _subset(per_task, members, task_of, position)
                idx = scoring.task_indices({t: len(o.refs) for t, o in subset.items()}, n_resamples,
                                           seed + zlib.crc32(f"{key}={value}".encode()))
                ms = scoring.score_model(subset, idx)
                overall[value] = ms.overall
                rows += _rows(key, value, model, ms, len(members))
            hi, lo = max(overall, key=overall.get), min(overall, key=overall.get)  # type: ignore[arg-type]
            gaps.append({"slice": key, "model": model, "high": hi, "low": lo,
                         "gap": overall[hi] - overall[lo], "scores": overall})
    return SliceTable(rows, gaps)


def _subset(per_task: Mapping[str, scoring.TaskOutputs], members: list[int], task_of: Sequence[str],
            position: list[int]) -> dict[str, scoring.TaskOutputs]:
    """The outputs of the examples in ``members``, per task."""
    picked: dict[str, list[int]] = {}
    for i in members:
        picked.setdefault(task_of[i], []).append(position[i])
    out = {}
    for t, ks in picked.items():
        o = per_task[t]
        out[t] = scoring.TaskOutputs(o.task_type, [o.refs[k] for k in ks], [o.preds[k] for k in ks], o.labels,
                                     [o.nll[k] for k in ks], [o.tokens[k] for k in ks])
    return out


def _rows(key: str, value: str, model: str, ms: scoring.ModelScores, n: int) -> list[dict[str, Any]]:
    out = [{"slice": key, "value": value, "model": model, "task": "overall", "metric": "score", "n": n,
            "score": ms.overall, "low": ms.overall_interval[0], "high": ms.overall_interval[1]}]
    for t, s in sorted(ms.tasks.items()):
        out += [{"slice": key, "value": value, "model": model, "task": t, "metric": k, "n": len(s.per_example),
                 "score": v, "low": s.intervals.get(k, [v, v])[0], "high": s.intervals.get(k, [v, v])[1]}
                for k, v in s.values.items()]
    return out


def markdown(table: SliceTable) -> str:
    """The overall score per slice value and model, and the largest gap named."""
    lines = ["| slice | value | model | n | score (95% CI) |", "|---|---|---|---|---|"]
    for r in table.rows:
        if r["task"] == "overall":
            lines.append(f"| {r['slice']} | {r['value']} | {r['model']} | {r['n']} | "
                         f"{r['score']:.3f} [{r['low']:.3f}, {r['high']:.3f}] |")
    lines += ["", "| slice | model | highest | lowest | gap |", "|---|---|---|---|---|"]
    lines += [f"| {g['slice']} | {g['model']} | {g['high']} ({g['scores'][g['high']]:.3f}) | "
              f"{g['low']} ({g['scores'][g['low']]:.3f}) | {g['gap']:.3f} |" for g in table.gaps]
    gap = table.largest_gap()
    if gap is not None:
        lines.append(f"\nLargest gap between slices: **{gap['slice']}** for **{gap['model']}**: "
                     f"{gap['high']} scores {gap['scores'][gap['high']]:.3f}, {gap['low']} scores "
                     f"{gap['scores'][gap['low']]:.3f} (gap {gap['gap']:.3f}).")
    return "\n".join(lines) + "\n"

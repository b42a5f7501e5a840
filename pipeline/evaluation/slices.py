"""Bias slices: every metric of every model on each slice of the test set, and the largest gap.

A slice is a key naming a field of the prepared example (``task``, ``source``, any other
field), a metadata column (``meta.<column>``) or a derived value (``input_length``: the
prompt's word count, bucketed by ``eval.length_buckets``). Each slice value is scored
with the same code as the whole test set (:func:`pipeline.evaluation.scoring.score_model`), with
its own intervals (seeded as the whole test set's: the same examples, the same interval), so a gap
between slices is read with its uncertainty. Gaps compare slices within one task: ``input_length
<=20`` holding only one task and ``>40`` only another would otherwise show a task difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.core.errors import SliceError
from pipeline.evaluation import resampling as R
from pipeline.evaluation import scoring


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
    """``rows``: one per (slice key, value, model, task or overall, metric); ``gaps``: per key, model and
    task (and overall, between values holding the same tasks), each between two cells of ``min_n`` or more."""

    rows: list[dict[str, Any]]
    gaps: list[dict[str, Any]]

    def largest_gap(self) -> dict[str, Any] | None:
        return max(self.gaps, key=lambda g: g["gap"], default=None)


def score_slices(keys: Sequence[str], values: Sequence[Mapping[str, str]],
                 outputs: Mapping[str, Mapping[str, scoring.TaskOutputs]], task_of: Sequence[str],
                 n_resamples: int, seed: int, min_n: int = scoring.MIN_N) -> SliceTable:
    """Score every model on every slice value; ``values[i][key]`` is example ``i``'s value.

    ``outputs[model][task]`` holds the task's examples in test order and ``task_of[i]``
    each example's task, so example ``i`` is the ``k``-th row of its task's outputs. Gaps are
    within a task: a gap between slices that hold different tasks would be a task difference.
    """
    position, seen = [], {}  # example i -> its row within its task
    for t in task_of:
        position.append(seen.get(t, 0))
        seen[t] = position[-1] + 1
    rows: list[dict[str, Any]] = []
    for key in keys:
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(v[key], []).append(i)
        for model, per_task in outputs.items():
            for value, members in sorted(groups.items()):
                subset, picked = _subset(per_task, members, task_of, position)
                # One seed policy (scoring.cell_seed): a cell holding all of a task's examples is resampled
                # exactly as in the whole-test table, so the same quantity gets the same interval.
                whole = {t: None if len(ks) == seen[t] else ks for t, ks in picked.items()}
                idx = scoring.task_indices({t: len(o.refs) for t, o in subset.items()}, n_resamples, seed, whole)
                rows += _rows(key, value, model, scoring.score_model(subset, idx), len(members))
    return SliceTable(rows, _gaps(rows, min_n))


def _subset(per_task: Mapping[str, scoring.TaskOutputs], members: list[int], task_of: Sequence[str],
            position: list[int]) -> tuple[dict[str, scoring.TaskOutputs], dict[str, list[int]]]:
    """The outputs of the examples in ``members``, per task, and their positions within each task."""
    picked: dict[str, list[int]] = {}
    for i in members:
        picked.setdefault(task_of[i], []).append(position[i])
    out = {}
    for t, ks in picked.items():
        o = per_task[t]
        out[t] = scoring.TaskOutputs(o.task_type, [o.refs[k] for k in ks], [o.preds[k] for k in ks], o.labels,
                                     [o.nll[k] for k in ks], [o.tokens[k] for k in ks])
    return out, picked


def _rows(key: str, value: str, model: str, ms: scoring.ModelScores, n: int) -> list[dict[str, Any]]:
    out = [{"slice": key, "value": value, "model": model, "task": "overall", "metric": "score", "n": n,
            "score": ms.overall, "low": ms.overall_interval[0], "high": ms.overall_interval[1],
            "tasks": sorted(ms.tasks), "primary": False}]
    for t, s in sorted(ms.tasks.items()):
        primary = scoring.PRIMARY[s.task_type]
        out += [{"slice": key, "value": value, "model": model, "task": t, "metric": k, "n": len(s.per_example),
                 "score": v, "low": s.intervals[k][0], "high": s.intervals[k][1], "primary": k == primary}
                for k, v in s.values.items()]
    return out


def _gaps(rows: list[dict[str, Any]], min_n: int) -> list[dict[str, Any]]:
    """Highest minus lowest slice value of each task's primary metric (cells of ``min_n`` or more), and of
    the overall score between values with the same task mix; each with a 95% interval (square-and-add
    of the two cells' own intervals: the cells hold different examples, so they are independent)."""
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        # A one-task overall score is that task's primary metric: its gap is already there.
        if r["n"] >= min_n and (r["primary"] or (r["task"] == "overall" and len(r["tasks"]) > 1)):
            mix = tuple(r.get("tasks", ()))  # the overall score compares only values holding the same tasks
            cells.setdefault((r["slice"], r["model"], r["task"], r["metric"], mix), {})[r["value"]] = r
    gaps = []
    for (key, model, task, metric, mix), by_value in cells.items():
        if len(by_value) < 2:
            continue
        order = sorted(by_value, key=lambda v: by_value[v]["score"])  # two distinct values even when tied
        hi, lo = order[-1], order[0]
        a, b = by_value[hi], by_value[lo]
        gap = a["score"] - b["score"]
        ci = R.square_and_add(gap, (a["score"], a["low"], a["high"]), (b["score"], b["low"], b["high"]))
        gaps.append({"slice": key, "model": model, "task": task, "metric": metric, "high": hi, "low": lo,
                     "gap": gap, "ci": ci, "scores": {v: r["score"] for v, r in by_value.items()},
                     "n": {v: r["n"] for v, r in by_value.items()}, **({"tasks": list(mix)} if mix else {})})
    return gaps


def markdown(table: SliceTable, min_n: int = scoring.MIN_N) -> str:
    """The overall score per slice value and model (with its task mix), the within-task gaps, the largest named."""
    lines = ["| slice | value | model | tasks | n | score (95% CI) |", "|---|---|---|---|---|---|"]
    for r in table.rows:
        if r["task"] == "overall":
            lines.append(f"| {r['slice']} | {r['value']} | {r['model']} | {', '.join(r['tasks'])} | {r['n']} | "
                         f"{scoring.value_cell(r['score'], [r['low'], r['high']], r['n'], min_n)} |")
    lines += ["", "| slice | model | task | metric | highest | lowest | gap (95% CI) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {g['slice']} | {g['model']} | {g['task']} | {g['metric']} | {g['high']} "
              f"({g['scores'][g['high']]:.3f}) | {g['low']} ({g['scores'][g['low']]:.3f}) | "
              f"{g['gap']:.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] |" for g in table.gaps]
    gap = table.largest_gap()
    if gap is None:
        lines.append(f"\nNo gap between slices to compare: no task has two slice values of {min_n} or more examples.")
    else:
        lines.append(f"\nLargest gap between slices: **{gap['slice']}** for **{gap['model']}** on **{gap['task']}** "
                     f"({gap['metric']}): {gap['high']} scores {gap['scores'][gap['high']]:.3f}, {gap['low']} scores "
                     f"{gap['scores'][gap['low']]:.3f} (gap {gap['gap']:.3f}, 95% CI [{gap['ci'][0]:+.3f}, "
                     f"{gap['ci'][1]:+.3f}]).")
    lines.append(f"\nGaps are within a task (the overall score only between values holding the same tasks); "
                 f"cells of fewer than {min_n} examples show the count: {scoring.TOO_FEW}.")
    return "\n".join(lines) + "\n"

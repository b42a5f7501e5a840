"""Scoring an evaluation: every metric of every task with a 95% bootstrap interval, the
overall score, and paired base-vs-tuned differences with p-values.

Point estimates come from :mod:`pipeline.evaluation.metrics` (scikit-learn, rouge-score, sacrebleu);
intervals from :mod:`pipeline.evaluation.resampling`. Each task draws one index matrix from a seed
and the task's name, and both models are resampled with it: the deltas are paired, and
row ``r`` of every task's matrix together is one stratified resample of the whole test
set, which is how the overall score (the mean of the tasks' primary metrics) gets its
interval.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.evaluation import metrics as M
from pipeline.evaluation import resampling as R

# The score each task type is summarised by (bars, the overall mean); all are in [0, 1].
PRIMARY = {"classification": "accuracy", "short_answer": "exact_match", "free_text": "rougeL"}
# Per-example score -> the corpus metric that is its mean.
_MEAN_OF = {"correct": "accuracy", "unmatched": "unmatched_rate"}


@dataclass
class TaskOutputs:
    """One model's outputs on one task: all that scoring needs."""

    task_type: str
    refs: list[str]
    preds: list[str]
    labels: list[str] | None  # classification only
    nll: list[float]  # summed NLL of each reference completion
    tokens: list[int]  # its token count


@dataclass
class TaskScores:
    """Metrics of one model on one task."""

    values: dict[str, float]  # metric -> point estimate
    intervals: dict[str, list[float]]  # metric -> [low, high]
    per_example: list[dict[str, float]]
    resampled: dict[str, np.ndarray]  # metric -> one value per resample (kept for paired deltas)
    labels: list[str] = field(default_factory=list)  # classification: each answer mapped onto the label set
    confusion: dict[str, Any] | None = None
    per_class: dict[str, dict[str, Any]] | None = None


@dataclass
class ModelScores:
    """Metrics of one model on every task, plus the overall score."""

    tasks: dict[str, TaskScores]
    overall: float
    overall_interval: list[float]
    overall_resampled: np.ndarray


def task_indices(sizes: Mapping[str, int], n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """One resample index matrix per task, seeded by ``seed`` and the task name.

    Seeding by name keeps a task's intervals unchanged when other tasks come or go.
    """
    return {t: R.resample_indices(n, n_resamples, (seed, zlib.crc32(t.encode()))) for t, n in sizes.items()}


def score_task(out: TaskOutputs, idx: np.ndarray) -> TaskScores:
    """Point estimates, per-example scores and bootstrap intervals of every metric of one task."""
    per_example = [M.per_example_scores(out.task_type, r, p, out.labels) for r, p in zip(out.refs, out.preds)]
    corpus = M.corpus_scores(out.task_type, out.refs, out.preds, out.labels)
    values = {k: float(v) for k, v in corpus.items() if isinstance(v, (int, float))}
    values["perplexity"] = R.perplexity(out.nll, out.tokens)
    resampled = {_MEAN_OF.get(k, k): R.mean_of([s[k] for s in per_example], idx) for k in per_example[0]}
    resampled["perplexity"] = R.perplexity_of(out.nll, out.tokens, idx)
    scores = TaskScores(values, {}, per_example, resampled)
    if out.task_type == "free_text":
        for kind in ("bleu", "chrf"):
            resampled[kind] = R.sacrebleu_of(kind, R.sacrebleu_stats(kind, out.refs, out.preds), idx)
    if out.task_type == "classification":
        _classification(out, corpus, idx, scores)
    scores.intervals = {k: R.interval(v) for k, v in resampled.items()}
    return scores


def _classification(out: TaskOutputs, corpus: dict[str, Any], idx: np.ndarray, scores: TaskScores) -> None:
    """Macro and per-class P/R/F1 resampled from confusion matrices; the matrix itself."""
    labels = list(out.labels or [])
    code = {label: i for i, label in enumerate(labels)} | {M.UNMATCHED: len(labels)}
    scores.labels = [M.extract_label(p, labels) for p in out.preds]
    matrices = R.confusion_of([code[r] for r in out.refs], [code[p] for p in scores.labels], len(labels) + 1, idx)
    per_class = R.per_class_of(matrices, len(labels))
    scores.resampled.update({f"macro_{k}": v.mean(axis=1) for k, v in per_class.items()})
    scores.confusion = corpus["confusion"]
    scores.per_class = {
        label: {**corpus["per_class"][label], **{f"{k}_ci": R.interval(per_class[k][:, j]) for k in per_class}}
        for j, label in enumerate(labels)
    }


def score_model(outputs: Mapping[str, TaskOutputs], indices: Mapping[str, np.ndarray]) -> ModelScores:
    """Score every task and the overall score (mean of the tasks' primary metrics)."""
    tasks = {t: score_task(o, indices[t]) for t, o in outputs.items()}
    primary = {t: PRIMARY[o.task_type] for t, o in outputs.items()}
    overall = float(np.mean([tasks[t].values[primary[t]] for t in tasks]))
    resampled = np.mean([tasks[t].resampled[primary[t]] for t in tasks], axis=0)
    return ModelScores(tasks, overall, R.interval(resampled), resampled)


def compare(base: ModelScores, tuned: ModelScores) -> dict[str, dict[str, dict[str, float]]]:
    """Paired bootstrap of tuned minus base for every metric of every task both scored, and of
    the overall score when both scored the same tasks (the encoder arm scores classification only)."""
    out = {
        t: {k: R.paired(u.values[k] - base.tasks[t].values[k], u.resampled[k] - base.tasks[t].resampled[k])
            for k in u.resampled if k in base.tasks[t].resampled}
        for t, u in tuned.tasks.items() if t in base.tasks
    }
    if set(tuned.tasks) == set(base.tasks):
        out["overall"] = {"score": R.paired(tuned.overall - base.overall,
                                            tuned.overall_resampled - base.overall_resampled)}
    return out


# The paired differences evaluate reports when both arms ran: (minuend, subtrahend).
PAIRS = (("tuned", "base"), ("tuned", "base_kshot"), ("base_kshot", "base"), ("tuned", "encoder"))


def partial_arms(scores: Mapping[str, ModelScores]) -> set[str]:
    """Arms that scored only some tasks (the encoder): their mean over those tasks is no overall score."""
    every = set().union(*(ms.tasks for ms in scores.values())) if scores else set()
    return {m for m, ms in scores.items() if set(ms.tasks) != every}


def delta_key(a: str, b: str) -> str:
    """Metrics key of ``a - b``: ``delta`` for tuned - base (the name it always had), else ``delta_a_vs_b``."""
    return "delta" if (a, b) == ("tuned", "base") else f"delta_{a}_vs_{b}"


def delta_pair(key: str) -> tuple[str, str] | None:
    """The inverse of :func:`delta_key`: ``(minuend, subtrahend)`` of a difference's key, None for an arm."""
    if key == "delta":
        return "tuned", "base"
    if key.startswith("delta_") and "_vs_" in key:
        a, b = key[len("delta_"):].split("_vs_", 1)
        return a, b
    return None


def compare_arms(scores: Mapping[str, ModelScores]) -> dict[str, dict[str, Any]]:
    """Paired bootstrap deltas of every pair in :data:`PAIRS` whose two arms were scored.

    The encoder's perplexity is over its label distribution, the causal LM's over answer tokens:
    that difference would mean nothing, so the tuned - encoder pair leaves it out.
    """
    out = {delta_key(a, b): compare(scores[b], scores[a]) for a, b in PAIRS if a in scores and b in scores}
    for per_task in out.get(delta_key("tuned", "encoder"), {}).values():
        per_task.pop("perplexity", None)
    return out


def metrics_json(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{model: {task: {metric: value}, overall: {score}}, delta: {...}}`` (DVC metrics, numbers only).

    ``deltas`` maps a :func:`delta_key` to that pair's :func:`compare` result.
    """
    partial = partial_arms(scores)
    out: dict[str, Any] = {
        m: {**{t: dict(s.values) for t, s in ms.tasks.items()},
            **({} if m in partial else {"overall": {"score": ms.overall}})}
        for m, ms in scores.items()
    }
    for key, pair in (deltas or {}).items():
        out[key] = {t: {k: d["delta"] for k, d in per.items()} for t, per in pair.items()}
    return out


def intervals_json(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any] | None) -> dict[str, Any]:
    """Intervals of every metric, paired deltas, per-class scores and confusion matrices."""
    partial = partial_arms(scores)
    intervals: dict[str, Any] = {
        m: {**{t: s.intervals for t, s in ms.tasks.items()},
            **({} if m in partial else {"overall": {"score": ms.overall_interval}})}
        for m, ms in scores.items()
    }
    intervals.update(deltas or {})
    return {
        "intervals": intervals,
        "per_class": {m: {t: s.per_class for t, s in ms.tasks.items() if s.per_class} for m, ms in scores.items()},
        "confusion": {m: {t: s.confusion for t, s in ms.tasks.items() if s.confusion} for m, ms in scores.items()},
    }


def confusion_rows(refs: list[str], labels: list[str]) -> list[dict[str, str]]:
    """One ``{actual, predicted}`` row per example: the data of DVC's ``confusion`` template."""
    return [{"actual": r, "predicted": p} for r, p in zip(refs, labels)]


def bar_rows(scores: Mapping[str, ModelScores], task_types: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each task's primary metric per model with its interval: the data of DVC's bar plot."""
    rows = []
    for t in sorted(task_types):
        metric = PRIMARY[task_types[t]]
        for m, ms in scores.items():
            if t not in ms.tasks:  # the encoder arm scores classification tasks only
                continue
            low, high = ms.tasks[t].intervals[metric]
            rows.append({"bar": f"{t} · {m}", "task": t, "model": m, "metric": metric,
                         "score": ms.tasks[t].values[metric], "low": low, "high": high})
    return rows


def markdown(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any] | None,
             task_types: Mapping[str, str]) -> str:
    """A table of every metric per task, each with its 95% interval, and each paired delta with its p-value."""
    models, deltas = list(scores), deltas or {}
    partial = partial_arms(scores)
    names = {delta_key(a, b): f"{a} − {b}" for a, b in PAIRS}
    head = "| task | metric | " + " | ".join(models) + "".join(f" | {names.get(k, k)} (95% CI, p)" for k in deltas)
    lines = [head + " |", "|---|---|" + "---|" * (len(models) + len(deltas))]
    rows = [(t, k) for t in sorted(task_types)
            for k in next(ms.tasks[t].values for ms in scores.values() if t in ms.tasks)]
    rows.append(("overall", "score"))
    for t, k in rows:
        cells = []
        for m in models:
            ms = scores[m]
            if (t == "overall" and m in partial) or (t != "overall" and (t not in ms.tasks or k not in ms.tasks[t].values)):
                cells.append("—")  # an arm that did not score this task (the encoder on generation tasks)
                continue
            value, (low, high) = ((ms.overall, ms.overall_interval) if t == "overall"
                                  else (ms.tasks[t].values[k], ms.tasks[t].intervals[k]))
            cells.append(f"{value:.3f} [{low:.3f}, {high:.3f}]")
        delta = "".join(" | —" if d is None else
                        f" | {d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], p={d['p_value']:.3f}"
                        for d in (pair.get(t, {}).get(k) for pair in deltas.values()))
        lines.append(f"| {t} | {k} | " + " | ".join(cells) + delta + " |")
    return "\n".join(lines) + "\n"

"""Scoring an evaluation: every metric of every task with a 95% bootstrap interval, the
overall score, and paired base-vs-tuned differences with p-values.

Point estimates come from :mod:`pipeline.evaluation.metrics` (scikit-learn, rouge-score, sacrebleu);
intervals from :mod:`pipeline.evaluation.resampling`. Each task draws one index matrix from a seed
and the task's name, and both models are resampled with it: the deltas are paired, and
row ``r`` of every task's matrix together is one stratified resample of the whole test
set, which is how the overall score (the mean of the tasks' primary metrics) gets its
interval.

Metrics that are the mean of a 0/1 score per example (:data:`BINARY`) always get the exact
Clopper-Pearson interval and, paired, the exact McNemar test: the bootstrap of a proportion
collapses to zero width at 0/n and n/n, and its p-value overclaims on a few discordant pairs.
A cell of fewer than :data:`MIN_N` examples is reported as a count, "too few to compare".
See ``docs/intervals.md``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.evaluation import metrics as M
from pipeline.evaluation import resampling as R

# The score each task type is summarised by (bars, the overall mean); all are in [0, 1].
PRIMARY = {"classification": "accuracy", "short_answer": "exact_match", "free_text": "rougeL"}
# Per-example score -> the corpus metric that is its mean.
_MEAN_OF = {"correct": "accuracy", "unmatched": "unmatched_rate", "correct_loglik": "accuracy_loglik"}
# Corpus metric -> its per-example 0/1 score: exact intervals and exact paired tests.
BINARY = {"accuracy": "correct", "unmatched_rate": "unmatched", "exact_match": "exact_match",
          "accuracy_loglik": "correct_loglik"}
# Per-example scores in [0, 1] whose mean is a metric (a degenerate bootstrap at 0 or 1 gets the exact bound).
_BOUNDED = ("rouge1", "rouge2", "rougeL", "token_f1")
# Below this many examples a cell (a task, a slice of a task) shows its count, not an interval or a p-value.
MIN_N = 10
TOO_FEW = "too few to compare"


@dataclass
class TaskOutputs:
    """One model's outputs on one task: all that scoring needs."""

    task_type: str
    refs: list[str]
    preds: list[str]
    labels: list[str] | None  # classification only
    nll: list[float]  # summed NLL of each reference completion
    tokens: list[int]  # its token count
    loglik: list[str] | None = None  # classification, causal LMs: each row's most likely label (loglik.py)


@dataclass
class TaskScores:
    """Metrics of one model on one task."""

    values: dict[str, float]  # metric -> point estimate
    intervals: dict[str, list[float]]  # metric -> [low, high]
    per_example: list[dict[str, float]]
    resampled: dict[str, np.ndarray]  # metric -> one value per resample (kept for paired deltas)
    methods: dict[str, str] = field(default_factory=dict)  # metric -> "exact", "exact bound" or "bootstrap"
    labels: list[str] = field(default_factory=list)  # classification: each answer mapped onto the label set
    confusion: dict[str, Any] | None = None
    per_class: dict[str, dict[str, Any]] | None = None
    task_type: str = ""
    confusion_loglik: dict[str, Any] | None = None  # the confusion matrix of the loglik labels
    labels_loglik: list[str] = field(default_factory=list)  # classification, causal LMs: the most likely label


@dataclass
class ModelScores:
    """Metrics of one model on every task, plus the overall score."""

    tasks: dict[str, TaskScores]
    overall: float
    overall_interval: list[float]
    overall_resampled: np.ndarray


def cell_seed(seed: int, task: str, positions: Sequence[int] | None = None) -> tuple[int, ...]:
    """The one seed policy: a cell's resamples depend on ``seed``, its task and which of the task's
    examples it holds (``positions``; None: all of them), never on the table it is shown in, so the
    same quantity has the same interval in the whole-test table and in every slice table."""
    base = (seed, zlib.crc32(task.encode()))
    return base if positions is None else (*base, zlib.crc32(np.asarray(positions, dtype=np.int64).tobytes()))


def task_indices(sizes: Mapping[str, int], n_resamples: int, seed: int,
                 positions: Mapping[str, Sequence[int] | None] | None = None) -> dict[str, np.ndarray]:
    """One resample index matrix per task, seeded by :func:`cell_seed`.

    Seeding by name keeps a task's intervals unchanged when other tasks come or go.
    """
    positions = positions or {}
    return {t: R.resample_indices(n, n_resamples, cell_seed(seed, t, positions.get(t))) for t, n in sizes.items()}


def score_task(out: TaskOutputs, idx: np.ndarray) -> TaskScores:
    """Point estimates, per-example scores and bootstrap intervals of every metric of one task."""
    per_example = [M.per_example_scores(out.task_type, r, p, out.labels) for r, p in zip(out.refs, out.preds)]
    corpus = M.corpus_scores(out.task_type, out.refs, out.preds, out.labels)
    values = {k: float(v) for k, v in corpus.items() if isinstance(v, (int, float))}
    if out.loglik is not None and out.task_type == "classification":
        for s, r, p in zip(per_example, out.refs, out.loglik):
            s["correct_loglik"] = float(p == r)
    resampled = {_MEAN_OF.get(k, k): R.mean_of([s[k] for s in per_example], idx) for k in per_example[0]}
    perplexity = R.perplexity(out.nll, out.tokens)
    if perplexity is not None:  # no reference tokens (all empty): no perplexity, rather than NaN
        values["perplexity"] = perplexity
        resampled["perplexity"] = R.perplexity_of(out.nll, out.tokens, idx)
    scores = TaskScores(values, {}, per_example, resampled, task_type=out.task_type)
    if out.task_type == "free_text":
        for kind in ("bleu", "chrf"):
            resampled[kind] = R.sacrebleu_of(kind, R.sacrebleu_stats(kind, out.refs, out.preds), idx)
    if out.task_type == "classification":
        _classification(out, corpus, idx, scores)
        if out.loglik is not None:
            _loglik(out, idx, scores)
    for k, stats in resampled.items():
        scores.intervals[k], scores.methods[k] = _interval(k, per_example, stats)
    return scores


def _interval(metric: str, per_example: list[dict[str, float]], stats: np.ndarray) -> tuple[list[float], str]:
    """A metric's interval and its method: exact for 0/1 scores, the bootstrap otherwise (see module doc)."""
    if metric in BINARY:
        hits = sum(s[BINARY[metric]] for s in per_example)
        return R.exact_interval(int(round(hits)), len(per_example)), "exact"
    if metric in _BOUNDED:
        return R.bounded_interval([s[metric] for s in per_example], stats)
    return R.interval(stats), "bootstrap"


def _classification(out: TaskOutputs, corpus: dict[str, Any], idx: np.ndarray, scores: TaskScores) -> None:
    """Macro and per-class P/R/F1 resampled from confusion matrices; the matrix itself."""
    labels = list(out.labels or [])
    code = {label: i for i, label in enumerate(labels)} | {M.UNMATCHED: len(labels)}
    scores.labels = [M.extract_label(p, labels) for p in out.preds]
    matrices = R.confusion_of([code[r] for r in out.refs], [code[p] for p in scores.labels], len(labels) + 1, idx)
    per_class = R.per_class_of(matrices, len(labels))
    scores.resampled.update({f"macro_{k}": R.macro_of(v, matrices, len(labels)) for k, v in per_class.items()})
    scores.confusion = corpus["confusion"]
    matrix = np.asarray(corpus["confusion"]["matrix"])
    # Recall is a proportion of the class's examples, precision of its predictions: exact intervals.
    exact = {"recall_ci": matrix.sum(axis=1), "precision_ci": matrix.sum(axis=0)}
    scores.per_class = {
        label: {**corpus["per_class"][label], "f1_ci": R.interval(per_class["f1"][:, j]),
                **{k: R.exact_interval(int(matrix[j, j]), int(totals[j])) for k, totals in exact.items()}}
        for j, label in enumerate(labels)
    }


def _loglik(out: TaskOutputs, idx: np.ndarray, scores: TaskScores) -> None:
    """Accuracy and macro-F1 of the loglik labels (resampled like the generated ones), and their matrix.
    ``accuracy_loglik`` itself comes from the per-example ``correct_loglik`` (exact interval)."""
    labels = list(out.labels or [])
    corpus = M.classification_scores(out.refs, out.loglik or [], labels)
    scores.values["accuracy_loglik"] = float(corpus["accuracy"])
    scores.values["macro_f1_loglik"] = float(corpus["macro_f1"])
    code = {label: i for i, label in enumerate(labels)} | {M.UNMATCHED: len(labels)}
    matrices = R.confusion_of([code[r] for r in out.refs], [code[p] for p in out.loglik or []], len(labels) + 1, idx)
    scores.resampled["macro_f1_loglik"] = R.macro_of(R.per_class_of(matrices, len(labels))["f1"], matrices,
                                                     len(labels))
    scores.confusion_loglik = corpus["confusion"]
    scores.labels_loglik = list(out.loglik or [])


def score_model(outputs: Mapping[str, TaskOutputs], indices: Mapping[str, np.ndarray]) -> ModelScores:
    """Score every task and the overall score (mean of the tasks' primary metrics)."""
    tasks = {t: score_task(o, indices[t]) for t, o in outputs.items()}
    primary = {t: PRIMARY[o.task_type] for t, o in outputs.items()}
    overall = float(np.mean([tasks[t].values[primary[t]] for t in tasks]))
    resampled = np.mean([tasks[t].resampled[primary[t]] for t in tasks], axis=0)
    ends = [(tasks[t].values[primary[t]], *tasks[t].intervals[primary[t]]) for t in tasks
            if R.degenerate(tasks[t].resampled[primary[t]])]
    return ModelScores(tasks, overall, _widen(R.interval(resampled), ends, len(tasks)), resampled)


def _widen(ci: list[float], ends: list[tuple[float, float, float]], k: int) -> list[float]:
    """A mean of ``k`` tasks' bootstrap interval, widened by the tasks whose bootstrap has no spread.

    Each such task's ``(value, low, high)`` moves the ends by its own interval over ``k``: as if its
    error were perfectly correlated with the rest, which is conservative.
    """
    low = ci[0] + sum(lo - v for v, lo, _ in ends) / k
    high = ci[1] + sum(hi - v for v, _, hi in ends) / k
    return [float(low), float(high)]


def compare(base: ModelScores, tuned: ModelScores) -> dict[str, dict[str, dict[str, Any]]]:
    """Tuned minus base for every metric of every task both scored, and for the overall score when
    both scored the same tasks (the encoder arm scores classification only): the exact McNemar test
    for :data:`BINARY` metrics, the paired bootstrap for the rest. Each carries ``n``, its examples."""
    out = {t: {k: paired_delta(base.tasks[t], u, k) for k in u.resampled if k in base.tasks[t].resampled}
           for t, u in tuned.tasks.items() if t in base.tasks}
    if set(tuned.tasks) == set(base.tasks):
        d = R.paired(tuned.overall - base.overall, tuned.overall_resampled - base.overall_resampled)
        ends = []
        for t, u in tuned.tasks.items():
            k = PRIMARY[u.task_type]
            if R.degenerate(u.resampled[k] - base.tasks[t].resampled[k]):
                ends.append((out[t][k]["delta"], out[t][k]["low"], out[t][k]["high"]))
        d["low"], d["high"] = _widen([d["low"], d["high"]], ends, len(tuned.tasks))
        out["overall"] = {"score": {**d, "n": sum(len(u.per_example) for u in tuned.tasks.values())}}
    return out


def paired_delta(base: TaskScores, tuned: TaskScores, metric: str) -> dict[str, Any]:
    """``tuned - base`` on one metric of one task: exact for 0/1 scores, else the paired bootstrap.

    A bootstrap whose deltas never vary (identical answers; both arms perfect) says nothing about
    the spread: its interval is then the square-and-add of the two arms' own intervals.
    """
    if metric in BINARY:
        key = BINARY[metric]
        d = R.paired_binary([s[key] for s in base.per_example], [s[key] for s in tuned.per_example])
        return {**d, "n": len(tuned.per_example)}
    deltas = tuned.resampled[metric] - base.resampled[metric]
    d = R.paired(tuned.values[metric] - base.values[metric], deltas)
    if R.degenerate(deltas):
        d["low"], d["high"] = R.square_and_add(d["delta"], (tuned.values[metric], *tuned.intervals[metric]),
                                               (base.values[metric], *base.intervals[metric]))
    return {**d, "n": len(tuned.per_example)}


# The paired differences evaluate reports when both arms ran: (minuend, subtrahend).
PAIRS = (("tuned", "base"), ("tuned", "base_kshot"), ("base_kshot", "base"), ("tuned", "encoder"),
         ("aligned", "tuned"), ("aligned", "base"))


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
    """Paired differences (:func:`compare`) of every pair in :data:`PAIRS` whose two arms were scored.

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


def headline_json(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a reader compares between experiments (DVC's one metrics file, ``headline.json``).

    Per arm: the overall score and each task's primary metric. Per paired difference: the
    overall score (or, for a pair without one, each shared task's primary metric) with
    ``ci_low``, ``ci_high`` and ``p``; the main pair (tuned - base, else the first of
    :data:`PAIRS` that ran) also per task. Keys keep ``metrics.json``'s names, so
    ``tuned.topic.accuracy`` means the same in both; every other metric stays in
    ``metrics.json`` and ``intervals.json``.
    """
    partial = partial_arms(scores)
    out: dict[str, Any] = {
        m: {**({} if m in partial else {"overall": {"score": ms.overall}}),
            **{t: {PRIMARY[s.task_type]: s.values[PRIMARY[s.task_type]]} for t, s in ms.tasks.items()}}
        for m, ms in scores.items()
    }
    deltas = deltas or {}
    main = next((k for k in deltas if "overall" in deltas[k]), None)
    for key, per_task in deltas.items():
        tasks = [t for t in per_task if t == "overall" or key == main or "overall" not in per_task]
        out[key] = {}
        for t in tasks:
            metric = "score" if t == "overall" else PRIMARY[scores[delta_pair(key)[0]].tasks[t].task_type]
            d = per_task[t].get(metric)
            if d is not None:
                out[key][t] = {metric: d["delta"], "ci_low": d["low"], "ci_high": d["high"], "p": d["p_value"]}
    return out


def intervals_json(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any] | None) -> dict[str, Any]:
    """Intervals of every metric, paired deltas, per-class scores, confusion matrices, each task's
    example count ``n`` and each interval's method (``exact``, ``exact bound`` or ``bootstrap``)."""
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
        "confusion_loglik": {m: {t: s.confusion_loglik for t, s in ms.tasks.items() if s.confusion_loglik}
                             for m, ms in scores.items()},
        "n": {t: len(s.per_example) for ms in scores.values() for t, s in ms.tasks.items()},
        "methods": {m: {t: s.methods for t, s in ms.tasks.items()} for m, ms in scores.items()},
        "min_n": MIN_N,
    }


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None (``null``): NaN is not valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


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


def format_p(d: Mapping[str, Any]) -> str:
    """``p=0.031``; ``p≤0.002`` for a bootstrap p-value at its floor (it can go no lower); ``p<0.001``."""
    p, floor = d.get("p_value"), d.get("p_floor")
    if p is None:
        return ""
    if floor is not None and p <= floor + 1e-12:
        return f"p≤{floor:.3f}"
    return "p<0.001" if p < 0.0005 else f"p={p:.3f}"


def value_cell(value: float, ci: Sequence[float] | None, n: int | None, min_n: int = MIN_N) -> str:
    """``0.958 [0.789, 0.999]``; below ``min_n`` examples the count instead of an interval."""
    if n is not None and n < min_n:
        return f"{value:.3f} (n={n}, {TOO_FEW})"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def delta_cell(d: Mapping[str, Any] | None, min_n: int = MIN_N) -> str:
    """``+0.167 [+0.021, +0.327], p=0.031``; below ``min_n`` examples the count instead."""
    if d is None:
        return "—"
    if d.get("n") is not None and d["n"] < min_n:
        return f"{d['delta']:+.3f} (n={d['n']}, {TOO_FEW})"
    p = format_p(d)
    return f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + (f", {p}" if p else "")


def markdown(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any] | None,
             task_types: Mapping[str, str]) -> str:
    """A table of every metric per task, each with its 95% interval, and each paired delta with its p-value;
    a footnote says how each was computed."""
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
            elif t == "overall":
                cells.append(value_cell(ms.overall, ms.overall_interval, None))
            else:
                s = ms.tasks[t]
                cells.append(value_cell(s.values[k], s.intervals[k], len(s.per_example)))
        delta = "".join(f" | {delta_cell(pair.get(t, {}).get(k))}" for pair in deltas.values())
        lines.append(f"| {t} | {k} | " + " | ".join(cells) + delta + " |")
    return "\n".join(lines) + "\n" + footnote(scores, deltas)


def footnote(scores: Mapping[str, ModelScores], deltas: Mapping[str, Any]) -> str:
    """How the table's intervals and p-values were computed, naming the metrics of each method."""
    methods: dict[str, set[str]] = {}
    for ms in scores.values():
        for s in ms.tasks.values():
            for k, how in s.methods.items():
                methods.setdefault(how, set()).add(k)
    named = {how: ", ".join(sorted(ks)) for how, ks in methods.items()}
    floors = {d["p_floor"] for pair in deltas.values() for per in pair.values() for d in per.values()
              if "p_floor" in d}
    parts = ["Intervals are 95%."]
    if "exact" in named:
        parts.append(f"Clopper-Pearson (exact binomial) for 0/1 scores per example ({named['exact']});")
    parts.append("percentile bootstrap over examples for the rest, stratified by task for the overall score")
    if "exact bound" in named:
        parts.append(f"(where every example scored 0 or 1 the exact n/n bound: {named['exact bound']})")
    parts[-1] += "."
    if deltas:
        parts.append("Differences are paired: exact McNemar (sign) test on the discordant examples for 0/1 scores, "
                     "the paired bootstrap for the rest" + (f" (p≤{min(floors):.3f} is its floor)" if floors else "")
                     + ".")
    parts.append(f"Cells of fewer than {MIN_N} examples show the count: {TOO_FEW}. See docs/intervals.md.")
    return "\n" + " ".join(parts) + "\n"

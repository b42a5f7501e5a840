"""Scores for generated answers: label extraction, corpus metrics and bootstrap intervals.

Pure functions, numpy in and out, no file I/O. The formulas come from maintained
libraries (scikit-learn, rouge-score, sacrebleu); only the SQuAD normalization and
token F1 / exact match are written here, following the official SQuAD v2.0 script.

Empty inputs never crash: corpus metrics are 0.0 and bootstrap intervals are
``(0.0, 0.0, 0.0)`` (a paired bootstrap reports ``p_value`` 1.0), so an empty split shows
up as zeros in the metrics file instead of NaN or a traceback.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sacrebleu
from numpy.typing import ArrayLike
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from pipeline.evaluation.resampling import interval, paired, resample_indices

UNMATCHED = "<unmatched>"

# Quotes a chatty model wraps its answer in, beyond ASCII punctuation.
_STRIP_CHARS = string.punctuation + string.whitespace + "“”‘’«»„‚"
_PUNCTUATION = frozenset(string.punctuation)
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Stemming off: scores then depend only on the strings, not on an English stemmer.
# Note rouge-score's tokenizer keeps only [a-z0-9], so non-Latin text scores 0.
_ROUGE = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=False)


def extract_label(prediction: str, labels: Sequence[str]) -> str:
    """Map a generated answer onto ``labels``, or return ``UNMATCHED``.

    The first non-empty line, stripped of whitespace, punctuation and quotes and
    casefolded, is compared with the casefolded labels. Failing that, the labels named
    anywhere in the prediction as whole words (case-insensitive) are found; a label named
    only inside a longer label's mention does not count ("very positive" names
    "very positive", not also "positive"), so the longest label the answer names wins
    and "The topic is Sports." gives "sports". Two or more labels named apart is
    ambiguous and gives ``UNMATCHED``: nothing is silently dropped.
    """
    folded = {label.casefold(): label for label in labels}
    first_line = next((line for line in prediction.splitlines() if line.strip()), "")
    head = first_line.strip(_STRIP_CHARS).casefold()
    if head and head in folded:
        return folded[head]
    # Lookarounds rather than \b so labels that start or end with a non-word
    # character (e.g. "C++") still match as whole words.
    spans = {label: [m.span() for m in re.finditer(rf"(?<!\w){re.escape(label)}(?!\w)", prediction, re.IGNORECASE)]
             for label in labels if label}
    spans = {label: found for label, found in spans.items() if found}
    named = [label for label, found in spans.items()
             if not all(any(a <= s0 and e0 <= b and (a, b) != (s0, e0) for other, longer in spans.items()
                            if other != label for a, b in longer) for s0, e0 in found)]
    return named[0] if len(named) == 1 else UNMATCHED


def classification_scores(refs: Sequence[str], preds: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro P/R/F1, per-class scores over ``labels`` and a confusion matrix.

    ``preds`` are already-extracted labels; ``UNMATCHED`` counts as wrong and gets its
    own confusion-matrix column (its row is always zero). Any other value outside
    ``labels`` raises ``ValueError`` rather than vanishing from the matrix. The macro
    averages are over the labels with support in ``refs``: a label of the label set that
    this split never holds (seen only in train) has no recall to score, and counting it
    as 0 would cap a perfect model's macro-F1 below 1. Predictions of such a label still
    count against the true class's recall.
    """
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} references but {len(preds)} predictions")
    unknown = sorted((set(refs) | set(preds)) - {*labels, UNMATCHED})
    if unknown:
        raise ValueError(f"values not in the label set {list(labels)}: {unknown}")
    labels, matrix_labels = list(labels), [*labels, UNMATCHED]
    if len(refs) == 0:
        zero_class = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        return {
            "accuracy": 0.0, "macro_precision": 0.0, "macro_recall": 0.0, "macro_f1": 0.0,
            "unmatched_rate": 0.0, "per_class": {label: dict(zero_class) for label in labels},
            "confusion": {"labels": matrix_labels, "matrix": [[0] * len(matrix_labels) for _ in matrix_labels]},
        }
    refs, preds = list(refs), list(preds)
    precision, recall, f1, support = precision_recall_fscore_support(
        refs, preds, labels=labels, average=None, zero_division=0
    )
    matrix = confusion_matrix(refs, preds, labels=matrix_labels)
    # Mean of per-class scores over the supported labels == sklearn's average="macro" with those labels=.
    supported = np.asarray(support) > 0
    return {
        "accuracy": float(accuracy_score(refs, preds)),
        "macro_precision": float(np.mean(precision[supported])),
        "macro_recall": float(np.mean(recall[supported])),
        "macro_f1": float(np.mean(f1[supported])),
        "unmatched_rate": sum(p == UNMATCHED for p in preds) / len(preds),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion": {"labels": matrix_labels, "matrix": matrix.astype(int).tolist()},
    }


def squad_normalize(text: str) -> str:
    """Lowercase, drop punctuation, drop articles a/an/the, collapse whitespace (SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(ref: str, pred: str) -> float:
    """1.0 if the SQuAD-normalized strings are equal, else 0.0."""
    return float(squad_normalize(ref) == squad_normalize(pred))


def token_f1(ref: str, pred: str) -> float:
    """SQuAD token-overlap F1 between normalized ``ref`` and ``pred``.

    As in the SQuAD v2.0 script, if either side normalizes to no tokens the score is
    1.0 when both do and 0.0 otherwise.
    """
    ref_tokens, pred_tokens = squad_normalize(ref).split(), squad_normalize(pred).split()
    if not ref_tokens or not pred_tokens:
        return float(ref_tokens == pred_tokens)
    num_same = sum((Counter(ref_tokens) & Counter(pred_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def per_example_scores(
    task_type: str, ref: str, pred: str, labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Scores of one example, the unit that bootstrap resamples.

    classification: ``correct`` and ``unmatched`` (0/1, after ``extract_label``);
    short_answer: ``exact_match``, ``token_f1``; free_text: ``rouge1``, ``rouge2``,
    ``rougeL`` (F-measure) and ``exact_match``.
    """
    if task_type == "classification":
        if labels is None:
            raise ValueError("classification needs labels")
        label = extract_label(pred, labels)
        return {"correct": float(label == ref), "unmatched": float(label == UNMATCHED)}
    if task_type == "short_answer":
        return {"exact_match": exact_match(ref, pred), "token_f1": token_f1(ref, pred)}
    if task_type == "free_text":
        rouge = _ROUGE.score(ref, pred)
        return {**{name: rouge[name].fmeasure for name in _ROUGE_TYPES}, "exact_match": exact_match(ref, pred)}
    raise ValueError(f"unknown task_type {task_type!r}")


def corpus_scores(
    task_type: str, refs: Sequence[str], preds: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Corpus-level metrics for one task.

    classification: ``classification_scores`` on extracted labels; short_answer: mean
    ``exact_match`` and ``token_f1``; free_text: mean ROUGE-1/2/L F and ``exact_match``
    plus sacrebleu corpus ``bleu`` and ``chrf`` (on sacrebleu's 0-100 scale).
    """
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} references but {len(preds)} predictions")
    if task_type == "classification":
        if labels is None:
            raise ValueError("classification needs labels")
        return classification_scores(refs, [extract_label(p, labels) for p in preds], labels)
    rows = [per_example_scores(task_type, r, p, labels) for r, p in zip(refs, preds)]
    names = ("exact_match", "token_f1") if task_type == "short_answer" else (*_ROUGE_TYPES, "exact_match")
    scores = {name: float(np.mean([row[name] for row in rows])) if rows else 0.0 for name in names}
    if task_type == "free_text":
        # sacrebleu crashes on an empty corpus; an empty split scores 0 like the rest.
        scores["bleu"] = sacrebleu.corpus_bleu(list(preds), [list(refs)]).score if len(refs) else 0.0
        scores["chrf"] = sacrebleu.corpus_chrf(list(preds), [list(refs)]).score if len(refs) else 0.0
    return scores


def bootstrap_ci(
    values: ArrayLike,
    statistic: Callable[..., np.ndarray] = np.mean,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Percentile bootstrap ``(point, low, high)`` of ``statistic`` over 1-D ``values``.

    ``statistic`` must accept ``axis=`` (np.mean, np.median do) so all resamples are
    computed in one call. Empty ``values`` give ``(0.0, 0.0, 0.0)``.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return 0.0, 0.0, 0.0
    stats = statistic(values[resample_indices(values.size, n_resamples, seed)], axis=1)
    low, high = interval(stats, alpha)
    return float(statistic(values)), low, high


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """Paired bootstrap of ``mean(b) - mean(a)`` over the same examples (a=base, b=tuned).

    Returns ``delta``, the percentile interval ``low``/``high`` and a two-sided
    ``p_value`` = 2 * min(P(d <= 0), P(d >= 0)) over resampled deltas, clipped to 1.
    Each tail count gets +1 over n_resamples + 1, so the p-value never claims more
    precision than the resamples give: it is at least ``p_floor`` = 2 / (n_resamples + 1),
    and a p-value there reads "p ≤ p_floor". ``test`` is ``"bootstrap"``. For 0/1 scores
    :func:`pipeline.evaluation.resampling.paired_binary` (exact McNemar) fits better.
    Empty input gives delta 0.0, interval (0.0, 0.0), p_value 1.0.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        return {"delta": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "test": "bootstrap",
                "p_floor": 2 / (n_resamples + 1)}
    diffs = b - a
    deltas = diffs[resample_indices(diffs.size, n_resamples, seed)].mean(axis=1)
    return paired(float(diffs.mean()), deltas, alpha)


def bootstrap_metric(
    refs: Sequence[str],
    preds: Sequence[str],
    metric_fn: Callable[[list[str], list[str]], float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Percentile bootstrap ``(point, low, high)`` of a non-decomposable corpus metric.

    Example indices are resampled and ``metric_fn(refs_sample, preds_sample)`` is
    recomputed on each resample (e.g. macro-F1; pass a lean function such as
    ``partial(f1_score, labels=labels, average="macro", zero_division=0)`` since it
    runs ``n_resamples`` times). Empty input gives ``(0.0, 0.0, 0.0)``.
    """
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} references but {len(preds)} predictions")
    if len(refs) == 0:
        return 0.0, 0.0, 0.0
    refs_arr, preds_arr = np.asarray(refs, dtype=object), np.asarray(preds, dtype=object)
    stats = [
        metric_fn(refs_arr[row].tolist(), preds_arr[row].tolist())
        for row in resample_indices(len(refs), n_resamples, seed)
    ]
    low, high = interval(np.asarray(stats), alpha)
    return float(metric_fn(list(refs), list(preds))), low, high

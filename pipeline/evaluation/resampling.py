"""Bootstrap statistics computed for every resample at once.

Every function takes an ``(n_resamples, n)`` matrix of example indices (one row per
resample) and returns one value per row, so a metric's 1000 resamples cost one numpy
call instead of 1000 calls of the metric. Base and tuned are scored on the *same*
index matrix, which is what makes their difference a paired bootstrap.

Corpus metrics are resampled from per-example sufficient statistics, never from a
formula of our own where a library has one: BLEU and chrF from sacrebleu's own segment
statistics (the path sacrebleu's significance tests use), macro P/R/F1 from resampled
confusion matrices (checked against scikit-learn in the tests), perplexity as the
token-weighted mean NLL of the resampled examples.

The bootstrap says nothing where its resamples cannot vary (every example scored 1, one
example), so proportions of 0/1 outcomes get exact binomial intervals (Clopper-Pearson)
and exact tests (McNemar's, on the discordant pairs) instead: see ``docs/intervals.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from scipy.stats import beta, binom

ALPHA = 0.05  # 95% intervals

# sacrebleu's defaults, the same as sacrebleu.corpus_bleu / corpus_chrf use.
_SACREBLEU = {"bleu": BLEU, "chrf": CHRF}


def resample_indices(n: int, n_resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """An ``(n_resamples, n)`` matrix of indices drawn with replacement from a local generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def interval(stats: np.ndarray, alpha: float = ALPHA) -> list[float]:
    """Percentile interval ``[low, high]`` of resampled statistics (non-finite resamples left out)."""
    finite = np.asarray(stats, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:  # no resample has a value (a perplexity with no tokens): no interval
        return [float("nan"), float("nan")]
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def degenerate(stats: np.ndarray) -> bool:
    """True when every resample gave the same value: a zero-width interval that claims certainty."""
    finite = np.asarray(stats, dtype=float)
    finite = finite[np.isfinite(finite)]
    return bool(finite.size == 0 or np.ptp(finite) == 0)


def exact_interval(k: int, n: int, alpha: float = ALPHA) -> list[float]:
    """Clopper-Pearson interval of ``k`` successes in ``n``: coverage at least ``1 - alpha`` for every p.

    The beta-quantile form, equal to ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``.
    ``n = 0`` (no data) gives ``[0, 1]``.
    """
    low = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    high = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return [float(low), float(high)]


def bounded_interval(values: Sequence[float], stats: np.ndarray, alpha: float = ALPHA) -> tuple[list[float], str]:
    """Interval of the mean of per-example scores in [0, 1], and the method that gave it.

    A degenerate bootstrap at 0 or 1 (every example scored 1, say) is replaced by the exact bound of
    n/n (or 0/n): valid for any score in [0, 1], since P(score = 1) <= mean, so n perfect examples are
    at least as likely under a 0/1 score with that mean.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size and degenerate(stats) and (np.all(arr == 1.0) or np.all(arr == 0.0)):
        return exact_interval(int(arr.sum()), arr.size, alpha), "exact bound"
    return interval(stats, alpha), "bootstrap"


def paired(delta: float, deltas: np.ndarray, alpha: float = ALPHA) -> dict[str, Any]:
    """Point ``delta``, its percentile interval and a two-sided bootstrap p-value.

    ``p_value`` = 2 * min(P(d <= 0), P(d >= 0)) over the resampled deltas with +1
    smoothing on both counts, so it is never below ``p_floor`` = 2 / (n_resamples + 1)
    (a p-value there reads "at most p_floor") and is 1.0 when the two models never differ.
    """
    low, high = interval(deltas, alpha)
    finite = deltas[np.isfinite(deltas)]
    tail = min(int(np.sum(finite <= 0)), int(np.sum(finite >= 0)))
    p_value = min(1.0, 2 * (tail + 1) / (finite.size + 1))
    return {"delta": float(delta), "low": low, "high": high, "p_value": float(p_value),
            "test": "bootstrap", "p_floor": 2 / (finite.size + 1)}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided McNemar (sign) test: ``wins`` and ``losses`` are the discordant pairs.

    Equal to ``scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue``; 1.0 with no discordant pair.
    """
    n = wins + losses
    return 1.0 if n == 0 else float(min(1.0, 2 * binom.cdf(min(wins, losses), n, 0.5)))


def square_and_add(delta: float, minuend: Sequence[float], subtrahend: Sequence[float],
                   phi: float = 0.0) -> list[float]:
    """Newcombe's square-and-add interval of ``a - b`` from each side's ``(value, low, high)``.

    ``phi`` is the correlation of the two (the paired 2x2 table's phi, Newcombe 1998 method 10);
    0 treats them as independent, which is wider than the truth when they correlate positively.
    """
    (a, a_low, a_high), (b, b_low, b_high) = minuend, subtrahend
    down = (a - a_low) ** 2 - 2 * phi * (a - a_low) * (b_high - b) + (b_high - b) ** 2
    up = (a_high - a) ** 2 - 2 * phi * (a_high - a) * (b - b_low) + (b - b_low) ** 2
    return [float(delta - np.sqrt(max(down, 0.0))), float(delta + np.sqrt(max(up, 0.0)))]


def paired_binary(base: Sequence[float], tuned: Sequence[float], alpha: float = ALPHA) -> dict[str, Any]:
    """``mean(tuned) - mean(base)`` of 0/1 scores on the same examples: exact McNemar p, Newcombe interval.

    Only the discordant examples carry evidence: ``wins`` (tuned right, base wrong) against ``losses``.
    """
    a, b = np.asarray(base, dtype=float) > 0.5, np.asarray(tuned, dtype=float) > 0.5
    n = a.size
    both, wins, losses = int(np.sum(a & b)), int(np.sum(b & ~a)), int(np.sum(a & ~b))
    neither = n - both - wins - losses
    margins = (both + wins) * (losses + neither) * (both + losses) * (wins + neither)
    phi = (both * neither - wins * losses) / np.sqrt(margins) if margins else 0.0
    kb, ka = both + wins, both + losses
    delta = (kb - ka) / n if n else 0.0
    low, high = square_and_add(delta, (kb / n, *exact_interval(kb, n, alpha)),
                               (ka / n, *exact_interval(ka, n, alpha)), phi) if n else [0.0, 0.0]
    return {"delta": float(delta), "low": low, "high": high, "p_value": sign_test(wins, losses),
            "test": "exact McNemar", "discordant": [wins, losses]}


def mean_of(values: Sequence[float], idx: np.ndarray) -> np.ndarray:
    """Mean of per-example ``values`` in each resample."""
    return np.asarray(values, dtype=float)[idx].mean(axis=1)


def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float | None:
    """exp(total NLL / total tokens): the perplexity of all reference tokens together; None without tokens."""
    total = float(np.sum(tokens))
    return float(np.exp(np.sum(nll) / total)) if total else None


def perplexity_of(nll: Sequence[float], tokens: Sequence[int], idx: np.ndarray) -> np.ndarray:
    """Perplexity of each resample: examples are resampled, the ratio is token-weighted (NaN: no tokens drawn)."""
    nll_arr, tok_arr = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    total = tok_arr[idx].sum(axis=1)
    return np.exp(np.divide(nll_arr[idx].sum(axis=1), total, out=np.full(total.shape, np.nan), where=total > 0))


def sacrebleu_stats(kind: str, refs: Sequence[str], preds: Sequence[str]) -> np.ndarray:
    """sacrebleu's per-segment sufficient statistics (``kind`` is bleu or chrf), one row per example."""
    metric = _SACREBLEU[kind]()
    # A private but long-stable sacrebleu API (2.x): what sacrebleu.significance resamples.
    return np.asarray(metric._extract_corpus_statistics(list(preds), [list(refs)]), dtype=float)


def sacrebleu_of(kind: str, stats: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Corpus BLEU or chrF (0-100) of each resample, from summed segment statistics."""
    metric = _SACREBLEU[kind]()
    # Summing stats over a resample = multiplying by how often each example was drawn.
    counts = np.zeros((idx.shape[0], stats.shape[0]))
    np.add.at(counts, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    summed = counts @ stats
    return np.array([metric._compute_score_from_stats(row.tolist()).score for row in summed])


def confusion_of(ref_codes: Sequence[int], pred_codes: Sequence[int], n_codes: int, idx: np.ndarray) -> np.ndarray:
    """``(n_resamples, n_codes, n_codes)`` confusion matrices (rows: reference, columns: prediction)."""
    codes = np.asarray(ref_codes) * n_codes + np.asarray(pred_codes)
    offsets = np.arange(idx.shape[0])[:, None] * n_codes * n_codes
    flat = np.bincount((codes[idx] + offsets).ravel(), minlength=idx.shape[0] * n_codes * n_codes)
    return flat.reshape(idx.shape[0], n_codes, n_codes)


def per_class_of(matrices: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1, each ``(n_resamples, n_labels)``, from confusion matrices.

    Codes ``>= n_labels`` (the unmatched answers) are predictions outside the label
    set: they count against the reference class's recall and belong to no class's
    precision. Zero denominators give 0, as scikit-learn's ``zero_division=0``.
    """
    tp = np.diagonal(matrices, axis1=1, axis2=2)[:, :n_labels].astype(float)
    predicted = matrices.sum(axis=1)[:, :n_labels]
    actual = matrices.sum(axis=2)[:, :n_labels]
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    both = predicted + actual  # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual)
    f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1}


def macro_of(per_class: np.ndarray, matrices: np.ndarray, n_labels: int) -> np.ndarray:
    """Mean of per-class scores over the labels with support in each resample (as in the point estimate).

    A label the test split never holds (seen only in train) would score 0 and cap a perfect model's
    macro-F1 below 1; averaging over supported labels is what scikit-learn does without ``labels=``.
    """
    supported = matrices.sum(axis=2)[:, :n_labels] > 0
    count = supported.sum(axis=1)
    return np.divide((per_class * supported).sum(axis=1), count, out=np.zeros(count.shape), where=count > 0)

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

ALPHA = 0.05  # 95% intervals

# sacrebleu's defaults, the same as sacrebleu.corpus_bleu / corpus_chrf use.
_SACREBLEU = {"bleu": BLEU, "chrf": CHRF}


def resample_indices(n: int, n_resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """An ``(n_resamples, n)`` matrix of indices drawn with replacement from a local generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def interval(stats: np.ndarray, alpha: float = ALPHA) -> list[float]:
    """Percentile interval ``[low, high]`` of resampled statistics."""
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def paired(delta: float, deltas: np.ndarray, alpha: float = ALPHA) -> dict[str, float]:
    """Point ``delta``, its percentile interval and a two-sided bootstrap p-value.

    ``p_value`` = 2 * min(P(d <= 0), P(d >= 0)) over the resampled deltas with +1
    smoothing on both counts, so it is never below 2 / (n_resamples + 1) and is 1.0
    when the two models never differ.
    """
    low, high = interval(deltas, alpha)
    tail = min(int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0)))
    p_value = min(1.0, 2 * (tail + 1) / (deltas.size + 1))
    return {"delta": float(delta), "low": low, "high": high, "p_value": float(p_value)}


def mean_of(values: Sequence[float], idx: np.ndarray) -> np.ndarray:
    """Mean of per-example ``values`` in each resample."""
    return np.asarray(values, dtype=float)[idx].mean(axis=1)


def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float:
    """exp(total NLL / total tokens): the perplexity of all reference tokens together."""
    total = float(np.sum(tokens))
    return float(np.exp(np.sum(nll) / total)) if total else float("nan")


def perplexity_of(nll: Sequence[float], tokens: Sequence[int], idx: np.ndarray) -> np.ndarray:
    """Perplexity of each resample: examples are resampled, the ratio is token-weighted."""
    nll_arr, tok_arr = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    return np.exp(nll_arr[idx].sum(axis=1) / np.maximum(tok_arr[idx].sum(axis=1), 1.0))


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

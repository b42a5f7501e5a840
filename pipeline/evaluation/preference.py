"""The preference metric of the aligned and tuned arms: on held-out (prompt, chosen, rejected) pairs,
the share of pairs whose chosen answer the model gives a higher log-prob than the rejected one.

The same pairs for both arms, so ``aligned - tuned`` is a paired difference of 0/1 scores, with
the exact paired interval evaluate uses for accuracy (:func:`pipeline.evaluation.resampling.paired_binary`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.evaluation import resampling as R


def report(prefers: Mapping[str, Sequence[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, intervals)``: each arm's ``accuracy`` (and ``delta_aligned_vs_tuned``), and the same
    with exact intervals, ``n`` and the paired test. Empty when no arm was scored on pairs."""
    metrics: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    for arm, scores in prefers.items():
        k, n = int(sum(scores)), len(scores)
        value = k / n if n else 0.0
        metrics[arm] = {"accuracy": value}
        intervals[arm] = {"accuracy": {"value": value, "ci": R.exact_interval(k, n), "n": n, "method": "exact"}}
    if "aligned" in prefers and "tuned" in prefers and prefers["tuned"]:
        d = R.paired_binary(prefers["tuned"], prefers["aligned"])
        metrics["delta_aligned_vs_tuned"] = {"accuracy": d["delta"]}
        intervals["delta_aligned_vs_tuned"] = {"accuracy": {**d, "n": len(prefers["aligned"])}}
    return metrics, intervals


def headline(intervals: Mapping[str, Any]) -> dict[str, Any]:
    """The preference block of ``headline.json``: each arm's accuracy, and aligned - tuned with
    ``ci_low``, ``ci_high`` and ``p``, as the other paired differences there."""
    out: dict[str, Any] = {}
    for arm, per in intervals.items():
        a = per["accuracy"]
        out[arm] = {"accuracy": a["value"]} if "ci" in a else \
            {"accuracy": a["delta"], "ci_low": a["low"], "ci_high": a["high"], "p": a["p_value"]}
    return out


def markdown(intervals: Mapping[str, Any]) -> str:
    """The report's preference section (empty without pairs)."""
    if not intervals:
        return ""
    lines = ["\n## Preference (held-out pairs)\n",
             "Share of pairs whose chosen answer the model gives the higher log-prob (95% exact interval).\n",
             "| model | accuracy | n |", "|---|---|---|"]
    for arm, per in intervals.items():
        a = per["accuracy"]
        if "ci" in a:
            lines.append(f"| {arm} | {a['value']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {a['n']} |")
        else:
            lines.append(f"| aligned − tuned | {a['delta']:+.3f} [{a['low']:+.3f}, {a['high']:+.3f}], "
                         f"p={a['p_value']:.3g} | {a['n']} |")
    return "\n".join(lines) + "\n"

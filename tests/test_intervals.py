"""Intervals and p-values at the edges where small fine-tuning experiments live (issue 25): 0/n and n/n,
a few discordant pairs, slices that hold different tasks, one-example tasks, absent labels, no tokens.

Each test names the point of the issue it proves; the last two are a seconds-long simulation
(fixed seed) of the coverage and the type-I error the report's numbers have."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline import compare
from pipeline.evaluation import resampling as R
from pipeline.evaluation import scoring, slices

LABELS = ["no", "yes"]


def classification(correct: list[bool], labels: list[str] = LABELS) -> scoring.TaskOutputs:
    """``len(correct)`` examples whose reference is "yes", answered right where ``correct``."""
    preds = ["yes" if c else "no" for c in correct]
    return scoring.TaskOutputs("classification", ["yes"] * len(correct), preds, labels,
                               [1.0] * len(correct), [1] * len(correct))


def short_answer(correct: list[bool], tokens: int = 1) -> scoring.TaskOutputs:
    preds = ["paris" if c else "rome" for c in correct]
    return scoring.TaskOutputs("short_answer", ["paris"] * len(correct), preds, None,
                               [1.0] * len(correct), [tokens] * len(correct))


def free_text(refs: list[str], preds: list[str]) -> scoring.TaskOutputs:
    return scoring.TaskOutputs("free_text", refs, preds, None, [1.0] * len(refs), [2] * len(refs))


def model(outputs: dict[str, scoring.TaskOutputs], n_resamples: int = 200, seed: int = 0) -> scoring.ModelScores:
    return scoring.score_model(outputs, scoring.task_indices({t: len(o.refs) for t, o in outputs.items()},
                                                             n_resamples, seed))


# --- 1. intervals honest at the boundary -------------------------------------------------------


def test_exact_interval_is_clopper_pearson() -> None:
    for k, n in ((24, 24), (0, 24), (23, 24), (1, 1), (3, 10)):
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        assert R.exact_interval(k, n) == pytest.approx([ci.low, ci.high])


def test_24_of_24_correct_is_not_reported_as_certain() -> None:
    s = scoring.score_task(classification([True] * 24), scoring.task_indices({"t": 24}, 200, 0)["t"])
    low, high = s.intervals["accuracy"]
    assert low == pytest.approx(0.8575, abs=1e-4) and high == 1.0  # was [1.000, 1.000]
    assert s.methods["accuracy"] == s.methods["unmatched_rate"] == "exact"
    assert s.intervals["unmatched_rate"] == pytest.approx([0.0, 1 - 0.8575], abs=1e-4)
    qa = scoring.score_task(short_answer([True] * 24), scoring.task_indices({"qa": 24}, 200, 0)["qa"])
    assert qa.intervals["exact_match"][0] == pytest.approx(0.8575, abs=1e-4)


def test_a_perfect_bounded_score_gets_the_exact_bound_and_the_overall_score_widens() -> None:
    refs = [f"the cat sat number {i}" for i in range(24)]
    perfect = model({"summary": free_text(refs, refs), "topic": classification([True] * 24)})
    rouge = perfect.tasks["summary"]
    assert rouge.methods["rougeL"] == "exact bound" and rouge.intervals["rougeL"][0] == pytest.approx(0.8575, abs=1e-4)
    assert rouge.methods["bleu"] == "bootstrap"
    # Every task perfect: the bootstrap of the overall score is [1, 1]; the tasks' exact bounds widen it.
    assert perfect.overall == 1.0 and perfect.overall_interval[0] == pytest.approx(0.8575, abs=1e-4)


def test_report_footnote_names_each_method() -> None:
    ms = model({"topic": classification([True] * 20 + [False] * 4)})
    text = scoring.markdown({"base": ms}, None, {"topic": "classification"})
    assert "Clopper-Pearson (exact binomial) for 0/1 scores per example (accuracy, unmatched_rate)" in text
    assert "percentile bootstrap" in text


# --- 2. paired tests that fit the data ---------------------------------------------------------


@pytest.mark.parametrize("wins, p", [(4, 0.125), (6, 0.03125)])
def test_few_discordant_pairs_get_the_exact_sign_test(wins: int, p: float) -> None:
    base = model({"topic": classification([False] * wins + [True] * (24 - wins))})
    tuned = model({"topic": classification([True] * 24)})
    d = scoring.compare(base, tuned)["topic"]["accuracy"]
    assert d["p_value"] == pytest.approx(p)  # the bootstrap said 0.024 and 0.002
    assert d["test"] == "exact McNemar" and d["discordant"] == [wins, 0] and d["n"] == 24
    assert d["delta"] == pytest.approx(wins / 24) and d["low"] < d["delta"] < d["high"]


def test_a_p_value_at_the_resampling_floor_reads_at_most() -> None:
    d = R.paired(0.5, np.full(1000, 0.5))
    assert scoring.delta_cell({**d, "n": 24}) == "+0.500 [+0.500, +0.500], p≤0.002"
    refs = [f"the cat sat number {i}" for i in range(24)]
    base = model({"summary": free_text(refs, ["a dog"] * 24)}, n_resamples=1000)
    tuned = model({"summary": free_text(refs, refs)}, n_resamples=1000)
    deltas = {"delta": scoring.compare(base, tuned)}
    text = scoring.markdown({"base": base, "tuned": tuned}, deltas, {"summary": "free_text"})
    assert "p≤0.002" in text and "p=0.002" not in text


def test_compare_arms_prints_the_floor_and_the_count() -> None:
    ev = compare.Evaluation("e", {"base": {"t": {"accuracy": 0.0}}, "tuned": {"t": {"accuracy": 1.0}}}, {
        "intervals": {"base": {"t": {"accuracy": [0.0, 0.975]}}, "tuned": {"t": {"accuracy": [0.025, 1.0]}},
                      "delta": {"t": {"accuracy": {"delta": 1.0, "low": 0.2, "high": 1.0, "p_value": 1.0,
                                                   "n": 1, "test": "exact McNemar"}},
                                "overall": {"score": {"delta": 1.0, "low": 0.2, "high": 1.0, "p_value": 2 / 1001,
                                                      "p_floor": 2 / 1001, "n": 40}}}},
        "task_types": {"t": "classification"}, "n": {"t": 1}})
    text = compare.arms_markdown([compare.arms_table(ev)])
    assert "| t | accuracy | 0.000 (n=1, too few to compare) | 1.000 (n=1, too few to compare) " in text
    assert "+1.000 (n=1, too few to compare)" in text
    assert "p≤0.002" in text and "p=0.002" not in text


# --- 3. slices within tasks, one seed policy ---------------------------------------------------


def slice_outputs() -> tuple[dict, list[str], list[dict[str, str]]]:
    """past_tense (ROUGE-L) only in <=20, qa (exact match) in >40 and 21-40: 12 examples per cell."""
    refs = [f"walked to the shop {i}" for i in range(12)]
    past = free_text(refs, refs)
    qa = short_answer([False] * 12 + [True] * 6 + [False] * 6)
    task_of = ["past_tense"] * 12 + ["qa"] * 24
    values = [{"input_length": "<=20"}] * 12 + [{"input_length": ">40"}] * 12 + [{"input_length": "21-40"}] * 12
    return {"m": {"past_tense": past, "qa": qa}}, task_of, values


def test_slice_gaps_are_within_a_task() -> None:
    outputs, task_of, values = slice_outputs()
    table = slices.score_slices(["input_length"], values, outputs, task_of, n_resamples=100, seed=0)
    gap = table.largest_gap()
    # The old table's largest gap: <=20 (past_tense, 1.0) against >40 (qa, 0.0), a task difference.
    assert (gap["task"], gap["metric"], gap["high"], gap["low"]) == ("qa", "exact_match", "21-40", ">40")
    assert gap["gap"] == pytest.approx(0.5) and gap["ci"][0] < 0.5 < gap["ci"][1]
    assert all(g["task"] != "overall" for g in table.gaps)  # no two values hold the same tasks
    assert "<=20" not in {g["high"] for g in table.gaps} | {g["low"] for g in table.gaps}


def test_the_same_quantity_has_the_same_interval_in_every_table() -> None:
    outputs, task_of, values = slice_outputs()
    by_task = [{"task": t} for t in task_of]
    table = slices.score_slices(["task"], by_task, outputs, task_of, n_resamples=100, seed=0)
    whole = model(outputs["m"], n_resamples=100, seed=0)
    row = next(r for r in table.rows if r["value"] == "qa" and r["metric"] == "token_f1")
    assert [row["low"], row["high"]] == whole.tasks["qa"].intervals["token_f1"]  # bootstrap: same resamples
    row = next(r for r in table.rows if r["value"] == "past_tense" and r["metric"] == "bleu")
    assert [row["low"], row["high"]] == whole.tasks["past_tense"].intervals["bleu"]


# --- 4. small-n guards, absent labels, no NaN ------------------------------------------------


def test_a_one_example_task_shows_its_count_not_an_interval() -> None:
    base = model({"one": classification([False]), "qa": short_answer([False] * 12)})
    tuned = model({"one": classification([True]), "qa": short_answer([True] * 12)})
    deltas = {"delta": scoring.compare(base, tuned)}
    assert deltas["delta"]["one"]["accuracy"]["p_value"] == 1.0  # one discordant pair is no evidence
    text = scoring.markdown({"base": base, "tuned": tuned}, deltas, {"one": "classification", "qa": "short_answer"})
    row = next(line for line in text.splitlines() if line.startswith("| one | accuracy |"))
    assert row == ("| one | accuracy | 0.000 (n=1, too few to compare) | 1.000 (n=1, too few to compare) "
                   "| +1.000 (n=1, too few to compare) |")
    qa = next(line for line in text.splitlines() if line.startswith("| qa | exact_match |"))
    assert "p<0.001" in qa and "too few" not in qa  # 12 of 12 discordant: 2 / 2**12


def test_macro_f1_is_over_labels_the_test_split_holds() -> None:
    # "maybe" is a label only train has: a perfect model must still score macro-F1 1.
    s = scoring.score_task(classification([True] * 12, ["maybe", "no", "yes"]),
                           scoring.task_indices({"t": 12}, 200, 0)["t"])
    s2 = scoring.score_task(scoring.TaskOutputs("classification", ["yes", "no"] * 6, ["yes", "no"] * 6,
                                                ["maybe", "no", "yes"], [1.0] * 12, [1] * 12),
                            scoring.task_indices({"t": 12}, 200, 0)["t"])
    for scores in (s, s2):
        assert scores.values["macro_f1"] == 1.0 and scores.values["macro_recall"] == 1.0  # was 0.667 and 0.5
        assert scores.intervals["macro_f1"][1] == 1.0
    assert s2.per_class["maybe"]["support"] == 0


def test_evaluate_writes_null_for_nan_and_an_exact_safety_interval(tmp_path) -> None:
    from pipeline import evaluate

    evaluate._write(tmp_path, {"m": {"t": {"perplexity": float("nan")}}}, {"delta": {"t": {"p": float("nan")}}},
                    {"x": [float("inf")]}, [{"s": float("nan")}])
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"m": {"t": {"perplexity": None}}}
    assert json.loads((tmp_path / "headline.json").read_text()) == {"delta": {"t": {"p": None}}}
    assert "NaN" not in (tmp_path / "intervals.json").read_text() + (tmp_path / "predictions.jsonl").read_text()
    from pipeline.data import safety

    text = evaluate._safety_markdown({"tuned": safety.flag_rate([[]] * 96)})  # 96 answers, none flagged
    assert "| tuned | 0/96 | 0.000 [0.000, 0.038] |" in text  # not [0.000, 0.000]


def test_a_task_without_reference_tokens_has_no_perplexity_and_the_json_has_no_nan() -> None:
    ms = model({"qa": short_answer([True] * 12, tokens=0)})
    assert "perplexity" not in ms.tasks["qa"].values and "perplexity" not in ms.tasks["qa"].intervals
    doc = scoring.intervals_json({"base": ms}, {"delta": scoring.compare(ms, ms)})
    json.dumps(doc, allow_nan=False)
    json.dumps(scoring.metrics_json({"base": ms}, None), allow_nan=False)
    assert doc["n"] == {"qa": 12} and doc["methods"]["base"]["qa"]["exact_match"] == "exact"
    assert scoring.json_safe({"a": [float("nan"), 1.0, np.float64("inf")]}) == {"a": [None, 1.0, None]}


# --- 5. simulation: coverage and type-I error at n = 24 ------------------------------------------


def test_simulated_coverage_of_accuracy_at_n24_p097() -> None:
    """500 test sets of 24 examples, each right with probability 0.97, scored by the real code."""
    rng = np.random.default_rng(2024)
    covered = 0
    for r in range(500):
        s = scoring.score_task(classification(list(rng.random(24) < 0.97)),
                               scoring.task_indices({"t": 24}, 10, r)["t"])
        low, high = s.intervals["accuracy"]
        covered += low <= 0.97 <= high
    assert covered / 500 >= 0.93  # measured 0.998; the percentile bootstrap (1000 resamples) gave 0.528


def test_simulated_type_one_error_of_the_paired_test_at_n24() -> None:
    """Two models with equal accuracy, 1000 paired test sets of 24: how often p <= 0.05."""
    rng = np.random.default_rng(2025)
    rejected = 0
    for r in range(1000):
        if r % 2:  # independent answers
            base, tuned = rng.random(24) < 0.7, rng.random(24) < 0.7
        else:  # correlated: both right 0.6, only base 0.1, only tuned 0.1, neither 0.2
            u = rng.random(24)
            base, tuned = u < 0.7, (u < 0.6) | ((u >= 0.7) & (u < 0.8))
        idx = scoring.task_indices({"qa": 24}, 10, r)
        d = scoring.compare(scoring.score_model({"qa": short_answer(list(base))}, idx),
                            scoring.score_model({"qa": short_answer(list(tuned))}, idx))
        rejected += d["qa"]["exact_match"]["p_value"] <= 0.05
    assert rejected / 1000 <= 0.06  # measured 0.013 (exact, so conservative); the bootstrap gave 0.050

"""Vectorized bootstrap statistics against the libraries they stand in for, and the scoring of a task,
a model and a base-vs-tuned comparison on hand-made outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from sklearn.metrics import precision_recall_fscore_support

from pipeline.evaluation import resampling as R
from pipeline.evaluation import scoring
from pipeline.evaluation.metrics import UNMATCHED

LABELS = ["business", "sports", "world"]


def test_sacrebleu_resamples_equal_sacrebleu_on_the_resampled_corpus() -> None:
    refs = ["the cat sat on the mat", "a quick brown fox", "it rained all day long", "prices rose again"]
    preds = ["the cat sat on a mat", "a brown fox", "it was raining all day", "prices rose"]
    idx = R.resample_indices(len(refs), 20, seed=0)
    for kind, corpus in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        fast = R.sacrebleu_of(kind, R.sacrebleu_stats(kind, refs, preds), idx)
        slow = [corpus([preds[i] for i in row], [[refs[i] for i in row]]).score for row in idx]
        assert fast == pytest.approx(slow, abs=1e-9)


def test_per_class_resamples_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 3, 30)
    preds = np.where(rng.random(30) < 0.2, 3, rng.integers(0, 3, 30))  # 3 = unmatched
    idx = R.resample_indices(30, 50, seed=1)
    per_class = R.per_class_of(R.confusion_of(refs, preds, 4, idx), 3)
    for r, row in enumerate(idx):
        p, rc, f, _ = precision_recall_fscore_support(refs[row], preds[row], labels=[0, 1, 2], average=None,
                                                      zero_division=0)
        assert per_class["precision"][r] == pytest.approx(p)
        assert per_class["recall"][r] == pytest.approx(rc)
        assert per_class["f1"][r] == pytest.approx(f)


def test_perplexity_is_token_weighted_and_resampled_by_example() -> None:
    nll, tokens = [2.0, 6.0], [1, 3]
    assert R.perplexity(nll, tokens) == pytest.approx(math.exp(8 / 4))
    idx = np.array([[0, 0], [1, 1], [0, 1]])
    assert R.perplexity_of(nll, tokens, idx) == pytest.approx([math.exp(2.0), math.exp(2.0), math.exp(2.0)])
    assert R.perplexity_of([1.0, 9.0], [1, 3], idx) == pytest.approx([math.e, math.exp(3.0), math.exp(10 / 4)])


def test_paired_summary_p_value_bounds() -> None:
    assert R.paired(0.0, np.zeros(99)) == {"delta": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0,
                                           "test": "bootstrap", "p_floor": pytest.approx(2 / 100)}
    clear = R.paired(0.5, np.full(99, 0.5))
    assert clear["p_value"] == pytest.approx(2 / 100) and clear["low"] == clear["high"] == 0.5
    assert clear["p_value"] <= clear["p_floor"]  # at the floor: reported as p≤0.020


def outputs(task_type: str, refs: list[str], preds: list[str], labels: list[str] | None = None) -> scoring.TaskOutputs:
    n = len(refs)
    return scoring.TaskOutputs(task_type, refs, preds, labels, [1.0 + i for i in range(n)], [2] * n)


TOPIC_REFS = ["sports", "business", "world", "sports", "world", "business"]
TASKS = {
    "topic": outputs("classification", TOPIC_REFS,
                     ["Sports", "business", "The answer is world.", "business", "weather", "Business!"], LABELS),
    "qa": outputs("short_answer", ["Paris", "1969", "Neil Armstrong", "blue"],
                  ["paris", "1970", "Armstrong", "The blue."]),
    "summary": outputs("free_text", ["prices rose sharply", "the team won again", "rain is expected"],
                       ["prices rose", "the team lost", "rain is expected"]),
}


@pytest.fixture(scope="module")
def base_scores() -> scoring.ModelScores:
    indices = scoring.task_indices({t: len(o.refs) for t, o in TASKS.items()}, 300, seed=0)
    return scoring.score_model(TASKS, indices)


def test_every_metric_has_an_interval_that_covers_its_mean_point(base_scores) -> None:
    for t, s in base_scores.tasks.items():
        assert set(s.intervals) == set(s.values), t
        for k, (low, high) in s.intervals.items():
            assert low <= high
            if k not in ("bleu", "chrf", "perplexity") and not k.startswith("macro_"):  # means: always covered
                assert low <= s.values[k] <= high, (t, k)
    low, high = base_scores.overall_interval
    assert low <= base_scores.overall <= high


def test_task_values_by_hand(base_scores) -> None:
    topic = base_scores.tasks["topic"]
    # extracted: sports, business, world, business, <unmatched>, business -> 4 of 6 right, 1 unmatched
    assert topic.labels == ["sports", "business", "world", "business", UNMATCHED, "business"]
    assert topic.values["accuracy"] == pytest.approx(4 / 6)
    assert topic.values["unmatched_rate"] == pytest.approx(1 / 6)
    assert topic.per_class["world"]["recall"] == pytest.approx(0.5)
    assert len(topic.per_class["world"]["recall_ci"]) == 2
    assert base_scores.tasks["qa"].values["exact_match"] == pytest.approx(2 / 4)
    assert base_scores.tasks["summary"].values["exact_match"] == pytest.approx(1 / 3)
    # overall = mean of primaries: accuracy, exact match, ROUGE-L
    expected = np.mean([4 / 6, 2 / 4, base_scores.tasks["summary"].values["rougeL"]])
    assert base_scores.overall == pytest.approx(expected)


def test_scoring_is_reproducible_with_a_seed(base_scores) -> None:
    again = scoring.score_model(TASKS, scoring.task_indices({t: len(o.refs) for t, o in TASKS.items()}, 300, seed=0))
    assert again.tasks["topic"].intervals == base_scores.tasks["topic"].intervals
    assert again.overall_interval == base_scores.overall_interval
    other = scoring.score_model(TASKS, scoring.task_indices({t: len(o.refs) for t, o in TASKS.items()}, 300, seed=1))
    assert other.overall_interval != base_scores.overall_interval


def test_compare_same_model_has_zero_deltas_and_p_value_one(base_scores) -> None:
    deltas = scoring.compare(base_scores, base_scores)
    assert set(deltas) == {"topic", "qa", "summary", "overall"}
    assert set(deltas["topic"]) == set(base_scores.tasks["topic"].values)
    for per in deltas.values():
        for d in per.values():
            # No difference and no evidence of one; the interval still says how large one could be.
            assert d["delta"] == 0.0 and d["p_value"] == 1.0 and d["low"] <= 0.0 <= d["high"]
    assert deltas["topic"]["accuracy"]["test"] == "exact McNemar"
    assert deltas["topic"]["accuracy"]["discordant"] == [0, 0]
    assert deltas["summary"]["rougeL"]["test"] == "bootstrap"


def test_compare_a_better_model_on_every_metric(base_scores) -> None:
    perfect = {t: scoring.TaskOutputs(o.task_type, o.refs, list(o.refs), o.labels, [n / 2 for n in o.nll], o.tokens)
               for t, o in TASKS.items()}
    indices = scoring.task_indices({t: len(o.refs) for t, o in TASKS.items()}, 300, seed=0)
    tuned = scoring.score_model(perfect, indices)
    deltas = scoring.compare(base_scores, tuned)
    assert deltas["topic"]["accuracy"]["delta"] == pytest.approx(2 / 6)
    assert deltas["topic"]["unmatched_rate"]["delta"] == pytest.approx(-1 / 6)
    assert deltas["qa"]["token_f1"]["delta"] > 0
    assert deltas["summary"]["bleu"]["delta"] > 0 and deltas["summary"]["chrf"]["delta"] > 0
    for t in TASKS:
        assert deltas[t]["perplexity"]["delta"] < 0 and deltas[t]["perplexity"]["high"] < 0
    overall = deltas["overall"]["score"]
    assert overall["delta"] == pytest.approx(tuned.overall - base_scores.overall) and overall["delta"] > 0
    assert overall["low"] <= overall["delta"] <= overall["high"]
    assert 0 < overall["p_value"] <= 1


def test_json_shapes_and_dvc_plot_rows(base_scores) -> None:
    scores = {"base": base_scores}
    metrics = scoring.metrics_json(scores, None)
    assert set(metrics) == {"base"} and metrics["base"]["overall"] == {"score": base_scores.overall}
    assert all(isinstance(v, float) for t in TASKS for v in metrics["base"][t].values())
    intervals = scoring.intervals_json(scores, None)
    assert intervals["confusion"]["base"]["topic"]["labels"] == [*LABELS, UNMATCHED]
    bars = scoring.bar_rows(scores, {t: o.task_type for t, o in TASKS.items()})
    assert [(b["task"], b["metric"]) for b in bars] == [("qa", "exact_match"), ("summary", "rougeL"),
                                                        ("topic", "accuracy")]
    assert scoring.confusion_rows(TOPIC_REFS[:2], ["sports", UNMATCHED]) == [
        {"actual": "sports", "predicted": "sports"}, {"actual": "business", "predicted": UNMATCHED}]
    table = scoring.markdown(scores, None, {t: o.task_type for t, o in TASKS.items()})
    assert "| topic | macro_f1 |" in table and "| overall | score |" in table


def test_headline_holds_each_arm_and_each_paired_difference_with_its_interval(base_scores) -> None:
    """DVC's one metrics file: per arm the overall score and each task's primary metric; per paired
    difference the overall with ci_low, ci_high and p, and the main pair (tuned - base) per task too."""
    perfect = {t: scoring.TaskOutputs(o.task_type, o.refs, list(o.refs), o.labels, o.nll, o.tokens)
               for t, o in TASKS.items()}
    tuned = scoring.score_model(perfect, scoring.task_indices({t: len(o.refs) for t, o in TASKS.items()}, 300, 0))
    scores = {"base": base_scores, "base_kshot": base_scores, "tuned": tuned}
    deltas = scoring.compare_arms(scores)
    headline = scoring.headline_json(scores, deltas)
    assert headline["tuned"] == {"overall": {"score": tuned.overall}, "topic": {"accuracy": 1.0},
                                 "qa": {"exact_match": 1.0}, "summary": {"rougeL": 1.0}}
    main = deltas["delta"]
    assert headline["delta"]["topic"] == {"accuracy": main["topic"]["accuracy"]["delta"],
                                          "ci_low": main["topic"]["accuracy"]["low"],
                                          "ci_high": main["topic"]["accuracy"]["high"],
                                          "p": main["topic"]["accuracy"]["p_value"]}
    assert set(headline["delta"]) == {"overall", "topic", "qa", "summary"}
    assert set(headline["delta_tuned_vs_base_kshot"]) == set(headline["delta_base_kshot_vs_base"]) == {"overall"}
    assert set(headline["delta"]["overall"]) == {"score", "ci_low", "ci_high", "p"}

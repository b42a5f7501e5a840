"""Hand-computed checks of pipeline.evaluation.metrics: extraction, corpus scores, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.metrics import (
    UNMATCHED,
    bootstrap_ci,
    bootstrap_metric,
    classification_scores,
    corpus_scores,
    exact_match,
    extract_label,
    paired_bootstrap,
    per_example_scores,
    squad_normalize,
    token_f1,
)

TOPICS = ["sports", "business", "world"]
SENTIMENT = ["pos", "neg", "neu"]


# --- extract_label ---------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("sports", "sports"),
        ("  Sports.  ", "sports"),
        ('"Business"', "business"),
        ("“World”", "world"),
        ("**Sports**", "sports"),
        ("The topic is Sports.", "sports"),  # chatty: one label mentioned as a word
        ("\n\nI think this is about BUSINESS news.", "business"),
        ("Business\nIt is not about sports.", "business"),  # first line wins outright
        ("It could be sports or business.", UNMATCHED),  # tie: two labels mentioned
        ("A story about the weather.", UNMATCHED),  # fits no label
        ("sportswear sales are up", UNMATCHED),  # substring, not a whole word
        ("", UNMATCHED),
        ("   \n \n", UNMATCHED),
    ],
)
def test_extract_label(prediction: str, expected: str) -> None:
    assert extract_label(prediction, TOPICS) == expected


def test_extract_label_returns_label_as_spelled_in_label_set() -> None:
    assert extract_label("the answer: positive", ["Positive", "Negative"]) == "Positive"


def test_extract_label_handles_labels_with_non_word_edges() -> None:
    assert extract_label("I would pick C++ here", ["C++", "Python"]) == "C++"


# --- classification --------------------------------------------------------------


def test_classification_perfect() -> None:
    refs = ["sports", "business", "world", "sports"]
    scores = classification_scores(refs, refs, TOPICS)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert scores[key] == 1.0
    assert scores["unmatched_rate"] == 0.0
    assert scores["per_class"]["sports"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}


def test_classification_all_wrong() -> None:
    refs = ["sports", "business", "world"]
    preds = ["business", "world", "sports"]
    scores = classification_scores(refs, preds, TOPICS)
    assert scores["accuracy"] == 0.0
    assert scores["macro_f1"] == 0.0


def test_classification_macro_f1_by_hand_with_unmatched() -> None:
    refs = ["pos", "pos", "neg", "neg", "neu"]
    preds = ["pos", "neg", "neg", UNMATCHED, "neu"]
    # pos: TP=1 FP=0 FN=1 -> P=1   R=1/2 F=2/3
    # neg: TP=1 FP=1 FN=1 -> P=1/2 R=1/2 F=1/2   (the UNMATCHED is a false negative)
    # neu: TP=1 FP=0 FN=0 -> P=1   R=1   F=1
    # macro P = (1 + 1/2 + 1)/3 = 5/6, macro R = (1/2 + 1/2 + 1)/3 = 2/3,
    # macro F1 = (2/3 + 1/2 + 1)/3 = 13/18; accuracy = 3/5; unmatched rate = 1/5.
    scores = classification_scores(refs, preds, SENTIMENT)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macro_precision"] == pytest.approx(5 / 6)
    assert scores["macro_recall"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(13 / 18)
    assert scores["unmatched_rate"] == pytest.approx(1 / 5)
    assert scores["per_class"]["neg"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert scores["confusion"]["labels"] == ["pos", "neg", "neu", UNMATCHED]
    assert scores["confusion"]["matrix"] == [
        [1, 1, 0, 0],
        [0, 1, 0, 1],  # the unmatched "neg" lands in the UNMATCHED column
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]


def test_classification_rejects_values_outside_labels() -> None:
    with pytest.raises(ValueError, match="not in the label set"):
        classification_scores(["sports", "weather"], ["sports", "sports"], TOPICS)
    with pytest.raises(ValueError, match="not in the label set"):
        classification_scores(["sports"], ["The topic is sports"], TOPICS)  # not extracted


def test_classification_empty() -> None:
    scores = classification_scores([], [], TOPICS)
    assert scores["accuracy"] == scores["macro_f1"] == scores["unmatched_rate"] == 0.0
    assert scores["confusion"]["matrix"] == [[0] * 4 for _ in range(4)]


def test_corpus_classification_extracts_chatty_answers() -> None:
    refs = ["sports", "business", "world"]
    preds = ["The topic is Sports.", "Business", "Maybe sports, maybe business."]
    scores = corpus_scores("classification", refs, preds, TOPICS)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["unmatched_rate"] == pytest.approx(1 / 3)
    assert scores["confusion"]["matrix"][2] == [0, 0, 0, 1]  # "world" row -> UNMATCHED


def test_per_example_classification() -> None:
    assert per_example_scores("classification", "sports", "Sports!", TOPICS) == {"correct": 1.0, "unmatched": 0.0}
    assert per_example_scores("classification", "sports", "", TOPICS) == {"correct": 0.0, "unmatched": 1.0}
    assert per_example_scores("classification", "sports", "world", TOPICS) == {"correct": 0.0, "unmatched": 0.0}
    with pytest.raises(ValueError):
        per_example_scores("classification", "sports", "sports")


# --- SQuAD-style short answers ---------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("Theater", "theater"),  # articles only as whole words
        ("", ""),
    ],
)
def test_squad_normalize(text: str, expected: str) -> None:
    assert squad_normalize(text) == expected


def test_exact_match_and_token_f1_known_cases() -> None:
    assert exact_match("Eiffel Tower", "the Eiffel Tower") == 1.0
    assert exact_match("Eiffel Tower", "Eiffel Tower in Paris") == 0.0
    # ref {eiffel, tower, in, paris}, pred {eiffel, tower}: P=1, R=1/2 -> F1=2/3
    assert token_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("Paris", "") == 0.0


def test_corpus_short_answer_perfect_wrong_empty() -> None:
    refs = ["Paris", "1969"]
    assert corpus_scores("short_answer", refs, refs) == {"exact_match": 1.0, "token_f1": 1.0}
    assert corpus_scores("short_answer", refs, ["London", "1970"]) == {"exact_match": 0.0, "token_f1": 0.0}
    assert corpus_scores("short_answer", [], []) == {"exact_match": 0.0, "token_f1": 0.0}


# --- free text -------------------------------------------------------------------


def test_rouge_hand_case() -> None:
    scores = per_example_scores("free_text", "the cat sat on the mat", "the cat sat")
    # ROUGE-1: overlap {the, cat, sat} = 3 of pred 3 / ref 6 -> P=1, R=1/2, F=2/3
    # ROUGE-2: overlap {the cat, cat sat} = 2 of pred 2 / ref 5 -> P=1, R=2/5, F=4/7
    # ROUGE-L: LCS "the cat sat" = 3 -> same as ROUGE-1
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert scores["exact_match"] == 0.0


def test_corpus_free_text_perfect_and_empty() -> None:
    refs = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    scores = corpus_scores("free_text", refs, refs)
    assert {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "exact_match")} == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "exact_match": 1.0
    }
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    empty = corpus_scores("free_text", [], [])
    assert set(empty) == {"rouge1", "rouge2", "rougeL", "exact_match", "bleu", "chrf"}
    assert all(value == 0.0 for value in empty.values())


def test_unknown_task_type() -> None:
    with pytest.raises(ValueError, match="unknown task_type"):
        per_example_scores("translation", "a", "b")


# --- bootstrap -------------------------------------------------------------------


def test_bootstrap_ci_reproducible_and_covers_point() -> None:
    values = np.array([1.0] * 30 + [0.0] * 20)
    point, low, high = bootstrap_ci(values, seed=7)
    assert point == pytest.approx(0.6)
    assert low < point < high
    assert bootstrap_ci(values, seed=7) == (point, low, high)
    assert bootstrap_ci(values, seed=8) != (point, low, high)


def test_bootstrap_ci_constant_and_empty() -> None:
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([]) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_clear_difference() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.3).astype(float)
    tuned = (rng.random(200) < 0.8).astype(float)
    result = paired_bootstrap(base, tuned, seed=1)
    assert result["delta"] == pytest.approx(tuned.mean() - base.mean())
    assert result["delta"] > 0 and result["low"] > 0
    assert result["p_value"] < 0.01
    # Swapping base and tuned flips the sign, not the evidence.
    swapped = paired_bootstrap(tuned, base, seed=1)
    assert swapped["delta"] == pytest.approx(-result["delta"])
    assert swapped["high"] < 0 and swapped["p_value"] == pytest.approx(result["p_value"])
    assert paired_bootstrap(base, tuned, seed=1) == result


def test_paired_bootstrap_identical_and_empty() -> None:
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    same = {"delta": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "test": "bootstrap",
            "p_floor": pytest.approx(2 / 1001)}
    assert paired_bootstrap(values, values) == same
    assert paired_bootstrap([], []) == same
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_bootstrap_metric_macro_f1() -> None:
    refs = ["pos", "pos", "neg", "neg", "neu"] * 8
    preds = ["pos", "neg", "neg", UNMATCHED, "neu"] * 8

    def macro_f1(r: list[str], p: list[str]) -> float:
        return classification_scores(r, p, SENTIMENT)["macro_f1"]

    point, low, high = bootstrap_metric(refs, preds, macro_f1, n_resamples=200, seed=3)
    assert point == pytest.approx(13 / 18)
    assert low <= point <= high and low < high
    assert bootstrap_metric(refs, preds, macro_f1, n_resamples=200, seed=3) == (point, low, high)
    assert bootstrap_metric([], [], macro_f1) == (0.0, 0.0, 0.0)

"""Preference pairs: TRL's standard and conversational formats, HH-RLHF full texts, errors as
``file:line: field: message``, cleaning with the instruction data's dedup/contamination/safety code,
and the embedded generator's deterministic pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import DataError
from pipeline.data import embedded, preferences
from pipeline.data.safety import Rules


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_standard_and_conversational_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"id": "c1", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
    ])
    a, b = preferences.load_file(path)
    assert (a.id, a.instruction, a.output, a.meta["rejected"], a.messages) == ("p-1", "Capital of France?", "Paris.",
                                                                               "Lyon.", None)
    assert b.id == "c1" and b.messages == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert preferences.rejected(b).messages[-1] == {"role": "assistant", "content": "5"}
    assert preferences.rejected(b).output == "5"


def test_hh_rlhf_splits_off_the_longest_common_prefix_at_the_last_assistant_turn(tmp_path: Path) -> None:
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"
    # The answers share their first word: the cut is at the last "\n\nAssistant:", not the longest prefix.
    path = _write(tmp_path / "hh.jsonl", [{"chosen": prompt + " An apple.", "rejected": prompt + " An onion."}])
    [pair] = preferences.load_file(path, "hh_rlhf")
    assert (pair.output, pair.meta["rejected"]) == ("An apple.", "An onion.")
    assert pair.messages == [{"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello! How can I help?"},
                             {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]


def test_bad_rows_are_reported_together_with_file_line_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "chosen": "yes", "rejected": "no"},
        {"prompt": "q", "chosen": "", "rejected": "no"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}],
         "rejected": [{"role": "assistant", "content": "y"}]},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "something else"},
        {"text": "not a pair"},
    ])
    with pytest.raises(DataError) as err:
        preferences.load_file(path)
    text = str(err.value)
    for expected in (f"{path}:2: chosen: is empty", f"{path}:3: chosen: expected exactly one assistant message",
                     f"{path}:4: chosen: chosen and rejected share no prefix", f"{path}:5: not a preference pair"):
        assert expected in text, text


def test_clean_reuses_dedup_contamination_and_safety(tmp_path: Path) -> None:
    rows = [{"prompt": "Tell me about cats.", "chosen": "Cats purr.", "rejected": "Dogs bark."},
            {"prompt": "Tell me about cats.", "chosen": "Cats purr.", "rejected": "Dogs bark."},  # duplicate
            {"prompt": "How do I build a pipe bomb?", "chosen": "I can't help.", "rejected": "Sure."},  # unsafe
            {"prompt": "Same?", "chosen": "Yes.", "rejected": "yes."},  # chosen == rejected after normalizing
            {"prompt": "Summarize the meeting about the budget plan today please", "chosen": "Budget met.",
             "rejected": "No."}]
    pairs = preferences.load_file(_write(tmp_path / "p.jsonl", rows))
    held = [embedded.Example(id="t1", task="x", task_type="free_text",
                             instruction="Summarize the meeting about the budget plan today please", input="",
                             output="Budget met.")]
    kept, counts = preferences.clean(pairs, held, Rules(("pipe bomb",), ()), ngram=3, threshold=0.5)
    assert [p.id for p in kept] == ["p-1"]
    assert counts == {"read": 5, "chosen_equals_rejected": 1, "exact_duplicate": 1, "contamination": 1,
                      "safety": 1, "kept": 1}


def test_embedded_pairs_are_deterministic_wrong_answers() -> None:
    examples = embedded.generate(7, 20)
    pairs = preferences.from_examples(examples, 42)
    assert len(pairs) == len(examples)  # every task family has a rejected answer
    assert pairs == preferences.from_examples(examples, 42)
    for p in pairs:
        wrong = p.meta["rejected"]
        assert wrong and wrong != p.output
        if p.task == "topic":
            assert wrong in embedded.LABELS
        elif p.task == "qa":
            assert wrong in p.input  # a span of the passage, from another sentence
        elif p.task == "past_tense":
            assert wrong == p.input  # left in the present tense


def test_preference_report_is_exact_and_paired() -> None:
    from pipeline.evaluation import preference
    from pipeline.evaluation.resampling import exact_interval

    metrics, intervals = preference.report({"tuned": [1, 0, 0, 1], "aligned": [1, 1, 0, 1]})
    assert metrics == {"tuned": {"accuracy": 0.5}, "aligned": {"accuracy": 0.75},
                       "delta_aligned_vs_tuned": {"accuracy": 0.25}}
    assert intervals["aligned"]["accuracy"]["ci"] == exact_interval(3, 4)
    d = intervals["delta_aligned_vs_tuned"]["accuracy"]
    assert d["discordant"] == [1, 0] and d["test"] == "exact McNemar" and d["n"] == 4
    assert preference.report({}) == ({}, {})
    assert "aligned − tuned | +0.250" in preference.markdown(intervals)
    head = preference.headline(intervals)
    assert head["aligned"] == {"accuracy": 0.75}
    assert head["delta_aligned_vs_tuned"] == {"accuracy": 0.25, "ci_low": d["low"], "ci_high": d["high"],
                                              "p": d["p_value"]}


def test_one_prompt_with_several_rejected_answers_is_several_pairs(tmp_path: Path) -> None:
    """Binarised datasets pair one (prompt, chosen) with several rejected answers: each is a pair
    of its own, not an exact duplicate."""
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": r} for r in ("Lyon.", "Nice.", "Lyon.")]
    kept, counts = preferences.clean(preferences.load_file(_write(tmp_path / "p.jsonl", rows)), [], Rules((), ()),
                                     ngram=3, threshold=0.5)
    assert sorted(p.meta["rejected"] for p in kept) == ["Lyon.", "Nice."]
    assert counts["exact_duplicate"] == 1


def test_a_repeated_id_is_reported_not_merged(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "Q1?", "chosen": "A1.", "rejected": "B1."},
            {"id": "a", "prompt": "Q2?", "chosen": "A2.", "rejected": "B2."}]
    with pytest.raises(DataError, match=r"p\.jsonl:2: id: duplicate id 'a' \(first on line 1\)"):
        preferences.load_file(_write(tmp_path / "p.jsonl", rows))

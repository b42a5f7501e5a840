"""The embedded dataset: deterministic, balanced, short, and with references derivable from inputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.data.embedded import LABELS, TASKS, generate
from pipeline.data.schema import TASK_TYPES, Example

N = 300


@pytest.fixture(scope="module")
def data() -> list[Example]:
    return generate(seed=0, n_per_task=N)


def by_task(data: list[Example], task: str) -> list[Example]:
    return [e for e in data if e.task == task]


def test_same_seed_same_list_and_other_seed_differs() -> None:
    assert generate(7, 40) == generate(7, 40)
    assert generate(7, 40) != generate(8, 40)


def test_global_random_state_is_untouched() -> None:
    random.seed(123)
    before = random.getstate()
    generate(3, 20)
    assert random.getstate() == before


def test_more_examples_only_append() -> None:
    small, large = generate(5, 10), generate(5, 30)
    for task in TASKS:
        assert by_task(large, task)[:10] == by_task(small, task)


def test_counts_ids_and_task_types(data: list[Example]) -> None:
    assert set(TASKS) == {"topic", "qa", "past_tense", "summary"}
    assert TASKS == {"topic": "classification", "qa": "short_answer",
                     "past_tense": "free_text", "summary": "free_text"}
    assert Counter(e.task for e in data) == {task: N for task in TASKS}
    assert len({e.id for e in data}) == len(data)
    for e in data:
        assert e.task_type == TASKS[e.task] and e.task_type in TASK_TYPES
    assert by_task(data, "qa")[3].id == "qa-0003"


def test_all_fields_are_nonempty_strings(data: list[Example]) -> None:
    for e in data:
        for name in ("id", "task", "task_type", "instruction", "input", "output", "source"):
            value = getattr(e, name)
            assert isinstance(value, str) and value.strip(), (e.id, name)
        assert e.source == "embedded" and isinstance(e.meta, dict)


@pytest.mark.parametrize("n", [1, 4, 7, 300])
def test_topic_labels_are_balanced(n: int) -> None:
    counts = Counter(e.output for e in generate(1, n) if e.task == "topic")
    assert set(counts) <= set(LABELS)
    assert sum(counts.values()) == n
    assert max(counts.values()) - min(counts.get(label, 0) for label in LABELS) <= 1


def test_topic_instruction_lists_the_labels(data: list[Example]) -> None:
    for e in by_task(data, "topic"):
        assert all(label in e.instruction for label in LABELS)
        assert e.output == e.meta["label"]


def test_qa_answer_is_a_unique_span_of_the_passage(data: list[Example]) -> None:
    for e in by_task(data, "qa"):
        passage, question = e.input.split("\nQuestion: ")
        assert passage.count(e.output) == 1, e
        assert 1 <= len(e.output.split()) <= 3
        assert question.endswith("?")


def test_qa_asks_every_kind_of_fact(data: list[Example]) -> None:
    assert len({e.meta["field"] for e in by_task(data, "qa")}) == 7


def test_past_tense_changes_only_the_verb(data: list[Example]) -> None:
    for e in by_task(data, "past_tense"):
        assert e.output != e.input
        src, out = e.input.split(), e.output.split()
        changed = [(a, b) for a, b in zip(src, out) if a != b]
        assert len(src) == len(out) and changed == [(e.meta["verb"], e.meta["past"])]
    assert any(e.meta["irregular"] for e in by_task(data, "past_tense"))
    assert not all(e.meta["irregular"] for e in by_task(data, "past_tense"))


def test_irregular_verbs_hand_checked(data: list[Example]) -> None:
    expected = {"goes": "went", "writes": "wrote", "buys": "bought", "teaches": "taught",
                "leaves": "left", "carries": "carried", "watches": "watched", "studies": "studied"}
    seen = {e.meta["verb"]: e for e in by_task(data, "past_tense")}
    for present, past in expected.items():
        e = seen[present]
        assert f" {present} " in e.input and f" {past} " in e.output
    irregular = {v: e.meta["irregular"] for v, e in seen.items()}
    assert irregular["goes"] and irregular["reads"] and irregular["makes"]
    assert not irregular["walks"] and not irregular["carries"] and not irregular["fixes"]


def test_summary_is_built_from_words_of_the_note(data: list[Example]) -> None:
    kinds = Counter(e.meta["kind"] for e in by_task(data, "summary"))
    assert set(kinds) == {"meeting", "order", "event"}
    for e in by_task(data, "summary"):
        note_words = set(e.input.replace(".", " ").split())
        content = {w for w in e.output.rstrip(".").split() if w[0].isupper() or w.isdigit()}
        assert content <= note_words, e  # names, days, cities, counts all come from the note


def test_reference_is_a_function_of_the_input() -> None:
    # Over many seeds, one input must never carry two different references.
    seen: dict[tuple[str, str], str] = {}
    for seed in range(5):
        for e in generate(seed, 200):
            assert seen.setdefault((e.task, e.input), e.output) == e.output, e


def test_duplicate_rate_is_low(data: list[Example]) -> None:
    rates = {}
    for task in TASKS:
        rows = by_task(data, task)
        rates[task] = 1 - len({(e.instruction, e.input) for e in rows}) / len(rows)
    print(f"\nexact duplicate (instruction, input) rate at n_per_task={N}: {rates}")
    assert all(rate < 0.02 for rate in rates.values()), rates


def test_sequences_are_short(data: list[Example]) -> None:
    for e in data:
        assert 6 <= len(e.input.split()) <= 40, e
        assert 1 <= len(e.output.split()) <= 15, e

"""The evaluate stage's small helpers: the template guard, the per-task cap, the label sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.evaluate import TemplateMismatch, check_template, label_sets, select_rows
from pipeline.core.files import write_json, write_jsonl


def template_files(tmp_path: Path, rendered_hash: str, trained_hash: str | None) -> tuple[Path, Path]:
    rendered, tuned = tmp_path / "rendered", tmp_path / "tuned"
    rendered.mkdir()
    tuned.mkdir()
    write_json(rendered / "template.json", {"name": "chat", "hash": rendered_hash})
    if trained_hash is not None:
        write_json(tuned / "template.json", {"name": "alpaca", "hash": trained_hash})
    return rendered, tuned


def test_check_template_refuses_a_different_hash(tmp_path: Path) -> None:
    rendered, tuned = template_files(tmp_path, "aaaa1111aaaa1111", "bbbb2222bbbb2222")
    with pytest.raises(TemplateMismatch) as info:
        check_template(rendered, tuned)
    message = str(info.value)
    assert "hash bbbb2222bbbb2222" in message and "rendered with hash aaaa1111aaaa1111" in message
    assert "'alpaca'" in message


def test_check_template_passes_an_equal_hash(tmp_path: Path) -> None:
    rendered, tuned = template_files(tmp_path, "aaaa1111aaaa1111", "aaaa1111aaaa1111")
    assert check_template(rendered, tuned) == "aaaa1111aaaa1111"


def test_check_template_without_a_trained_template_returns_the_rendered_hash(tmp_path: Path) -> None:
    rendered, tuned = template_files(tmp_path, "cccc3333cccc3333", None)  # base-only evaluation
    assert check_template(rendered, tuned) == "cccc3333cccc3333"


ROWS = [{"id": f"{t}{i}", "task": t} for i in range(4) for t in ("a", "b")] + [{"id": "c0", "task": "c"}]


def test_select_rows_caps_each_task_in_file_order() -> None:
    assert [r["id"] for r in select_rows(ROWS, 2)] == ["a0", "b0", "a1", "b1", "c0"]
    assert [r["id"] for r in select_rows(ROWS, 1)] == ["a0", "b0", "c0"]


def test_select_rows_without_a_cap_keeps_everything() -> None:
    assert select_rows(ROWS, None) == ROWS
    assert select_rows(ROWS, 100) == ROWS


def test_label_sets_read_classification_tasks_in_train_and_test_only(tmp_path: Path) -> None:
    def row(task: str, task_type: str, output: str) -> dict:
        return {"id": f"{task}-{output}", "task": task, "task_type": task_type, "output": output}

    write_jsonl(tmp_path / "train.jsonl", [row("sentiment", "classification", "positive"),
                                           row("sentiment", "classification", "negative"),
                                           row("capital", "short_answer", "Paris")])
    write_jsonl(tmp_path / "val.jsonl", [row("sentiment", "classification", "val-only"),
                                         row("topic", "classification", "val-only")])
    write_jsonl(tmp_path / "test.jsonl", [row("sentiment", "classification", "neutral"),
                                          row("topic", "classification", "sports"),
                                          row("summary", "free_text", "A summary.")])
    assert label_sets(tmp_path) == {"sentiment": ["negative", "neutral", "positive"], "topic": ["sports"]}

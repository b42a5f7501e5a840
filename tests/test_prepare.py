"""The prepare stage: exact-duplicate removal, the per-task split, and the stage end to end on
good and malformed local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import SHARED
from pipeline import prepare
from pipeline.data import dedup
from pipeline.data.schema import Example
from pipeline.core.files import read_json, read_jsonl
from pipeline.params import compose
from pipeline.core.cli import guard


def ex(i: int, task: str = "a", instruction: str = "Do it.", input: str = "", output: str | None = None) -> Example:
    return Example(id=f"{task}-{i}", task=task, task_type="free_text", instruction=instruction, input=input,
                   output=output if output is not None else f"answer {i}")


# --- deduplicate ------------------------------------------------------------------


def test_exact_duplicates_flag_later_rows_equal_after_normalization() -> None:
    rows = [ex(0, output="same"), ex(1, instruction="  DO   it.\n", output="same "), ex(2, output="other"),
            ex(3, task="b", output="same"), ex(4, instruction="Do it.", output="ｓａｍｅ")]  # full-width: NFKC
    assert dedup.exact_duplicates(rows) == [  # another task is not a duplicate
        {"id": "a-1", "reason": "exact_duplicate", "duplicate_of": "a-0"},
        {"id": "a-4", "reason": "exact_duplicate", "duplicate_of": "a-0"}]


def test_exact_duplicates_keep_fields_apart() -> None:
    assert dedup.exact_duplicates([ex(0, input="x", output="y"), ex(1, input="y", output="x")]) == []
    assert dedup.exact_duplicates([ex(0, instruction="a b", input=""), ex(1, instruction="a", input="b")]) == []


# --- split ------------------------------------------------------------------------

ROWS = [ex(i, task) for task, n in (("a", 20), ("b", 10), ("c", 3)) for i in range(n)]


def ids(splits: dict[str, list[Example]]) -> dict[str, list[str]]:
    return {s: [e.id for e in rows] for s, rows in splits.items()}


def test_split_is_disjoint_covering_and_per_task() -> None:
    splits = prepare.split(ROWS, val_fraction=0.1, test_fraction=0.2, seed=42)
    every = [i for rows in ids(splits).values() for i in rows]
    assert sorted(every) == sorted(e.id for e in ROWS) and len(set(every)) == len(every)
    per_task = {s: {t: sum(e.task == t for e in rows) for t in "abc"} for s, rows in splits.items()}
    assert per_task == {"test": {"a": 4, "b": 2, "c": 1}, "val": {"a": 2, "b": 1, "c": 1},
                        "train": {"a": 14, "b": 7, "c": 1}}


def test_split_is_deterministic_and_ignores_input_order() -> None:
    first = ids(prepare.split(ROWS, 0.1, 0.2, seed=42))
    assert ids(prepare.split(list(reversed(ROWS)), 0.1, 0.2, seed=42)) == first


def test_split_changes_with_the_seed() -> None:
    assert ids(prepare.split(ROWS, 0.1, 0.2, seed=42))["test"] != ids(prepare.split(ROWS, 0.1, 0.2, seed=43))["test"]


def test_one_tasks_split_does_not_depend_on_another() -> None:
    alone = prepare.split([e for e in ROWS if e.task == "a"], 0.1, 0.2, seed=42)
    together = prepare.split(ROWS, 0.1, 0.2, seed=42)
    assert ids(alone)["test"] == [e.id for e in together["test"] if e.task == "a"]


def test_tiny_tasks_go_to_train_only_when_even_pooled_they_cannot_split() -> None:
    splits = prepare.split([ex(0, "z"), ex(1, "z")], 0.1, 0.2, seed=0)
    assert ids(splits) == {"train": ["z-0", "z-1"], "val": [], "test": []}


# --- the stage end to end ---------------------------------------------------------


SEED_TASKS = SHARED / "data" / "self-instruct" / "seed_tasks.jsonl"
needs_shared = pytest.mark.skipif(not SEED_TASKS.is_file(), reason=f"{SEED_TASKS} not present")


def params_for(tmp_path: Path, data_file: Path, *overrides: str) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose(["data=local", f"data.path={data_file}", *overrides]), sort_keys=False))
    return params


MALFORMED = (b'{"instruction": "Say hi.", "output": "hi"}\n'
             b'{"instruction": "Broken", "output": \n'
             b'{"instruction": "No output here."}\n'
             b'{"instruction": "caf\xff", "output": "x"}\n')


def run_main(tmp_path: Path, data: bytes) -> tuple[int, Path, Path, Path]:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data)
    out, stats = tmp_path / "prepared", tmp_path / "reports" / "stats.json"
    code = guard("prepare", lambda: prepare.main(["--params", str(params_for(tmp_path, bad)), "--out", str(out),
                                                  "--stats", str(stats)]))  # what `python -m pipeline.prepare` runs
    return code, bad, out, stats


def test_malformed_file_fails_naming_file_and_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    code, bad, out, stats = run_main(tmp_path, MALFORMED)
    err = capsys.readouterr().err
    assert code == 1
    assert f"{bad}:2: invalid JSON: Expecting value at column 37" in err
    assert f"{bad}:4: not valid UTF-8: byte 0xff at column 21" in err
    assert not out.exists() and not stats.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "params.yaml"]  # no temp dirs left


def test_missing_field_is_named_with_file_and_line(tmp_path: Path, capsys) -> None:
    code, bad, out, stats = run_main(tmp_path, b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    assert code == 1
    assert capsys.readouterr().err == f"prepare: error: 1 problem(s) in the raw data:\n  {bad}:2: output: missing\n"
    assert not out.exists() and not stats.exists()


def test_parse_and_field_problems_are_reported_in_one_pass(tmp_path: Path, capsys) -> None:
    code, bad, _, _ = run_main(tmp_path, MALFORMED)
    err = capsys.readouterr().err
    assert code == 1
    assert "3 problem(s) in the raw data" in err
    assert f"{bad}:3: output: missing" in err


def test_good_file_is_prepared_with_counts_and_drops(tmp_path: Path, capsys) -> None:
    rows = [{"id": f"{t}{i}", "task": t, "instruction": f"Question {i} about {t}?", "input": "",
             "output": f"Answer {i}."} for t in ("geo", "math") for i in range(10)]
    rows += [{**rows[0], "id": "dup1", "output": " Answer 0. "}, {**rows[15], "id": "dup2"}]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out, stats = tmp_path / "prepared", tmp_path / "stats.json"

    code = prepare.main(["--params", str(params_for(tmp_path, good)), "--out", str(out), "--stats", str(stats)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["dropped.jsonl", "flagged.jsonl", "quarantine.jsonl", "safety.json",
                                                     "test.jsonl", "train.jsonl", "val.jsonl"]
    report = read_json(stats)
    assert report["loaded"] == 22 and report["kept"] == 20
    assert report["dropped"] == {"exact_duplicate": 2}
    assert report["dedup"]["exact_duplicate"] == {"found": 2, "removed": 2}
    assert report["quarantine"] == {"rows": 0, "problems": 0}
    assert report["sources"] == {"good.jsonl": {"loaded": 22, "used": 22}}
    assert report["per_source"]["test"] == {"good.jsonl": 4}
    assert report["splits"] == {"train": 14, "val": 2, "test": 4}
    assert report["per_task"]["test"] == {"geo": 2, "math": 2}
    assert report["task_types"] == {"geo": "free_text", "math": "free_text"}
    assert {d["id"]: d["duplicate_of"] for d in read_jsonl(out / "dropped.jsonl")} == {"dup1": "geo0", "dup2": "math5"}
    written = [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]
    assert sorted(r["id"] for r in written) == sorted(r["id"] for r in rows[:20])
    assert set(written[0]) == {"id", "task", "task_type", "instruction", "input", "output", "source", "meta"}
    assert "prepare: 20 examples" in capsys.readouterr().out


@needs_shared
def test_real_self_instruct_seed_tasks_as_one_task(tmp_path: Path, capsys) -> None:
    out, stats = tmp_path / "prepared", tmp_path / "stats.json"
    params = params_for(tmp_path, SEED_TASKS, "data.task=seed")
    assert prepare.main(["--params", str(params), "--out", str(out), "--stats", str(stats)]) == 0
    report = read_json(stats)
    assert (report["loaded"], report["kept"], report["dropped"]) == (175, 175, {})
    assert report["splits"] == {"train": 122, "val": 18, "test": 35}
    assert len(read_jsonl(out / "test.jsonl")) == 35


def test_too_few_rows_to_split_fail_cleanly(tmp_path: Path, capsys) -> None:
    code, _, out, stats = run_main(tmp_path, b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert code == 1
    assert "2 examples make 2 groups (data.group_by=auto)" in capsys.readouterr().err
    assert not out.exists() and not stats.exists()

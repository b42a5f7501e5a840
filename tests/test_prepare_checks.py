"""What prepare does to data beyond loading it: near-duplicates, train/eval contamination, the
quarantine of bad rows (`on_error: skip`), and mixtures of sources with weights and caps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import SHARED, config_with
from pipeline import prepare
from pipeline.core.config import ConfigError, DataConfig, from_mapping
from pipeline.data import dedup, mixture
from pipeline.data.schema import DataError, Example
from pipeline.core.files import read_json, read_jsonl
from pipeline.params import compose

SEED_TASKS = SHARED / "data" / "self-instruct" / "seed_tasks.jsonl"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def ex(i: int, text: str, output: str = "out", task: str = "t") -> Example:
    return Example(id=f"{task}-{i}", task=task, task_type="free_text", instruction="Summarize.", input=text,
                   output=output)


def data_cfg(*overrides: str) -> DataConfig:
    return from_mapping(compose(["data=local", "data.path=unused", *overrides])).data


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --- near duplicates --------------------------------------------------------------


def test_near_duplicates_find_a_one_word_edit_of_a_long_row() -> None:
    base = " ".join(WORDS)
    edited = base.replace("mike", "mikey")
    rows = [ex(0, base), ex(1, " ".join(reversed(WORDS))), ex(2, edited), ex(3, edited, task="other")]
    flags = dedup.near_duplicates(rows, threshold=0.7, shingle=3, num_perm=128)
    assert [(f["id"], f["duplicate_of"]) for f in flags] == [("t-2", "t-0")]  # another task is never a duplicate
    assert 0.7 <= flags[0]["similarity"] < 1.0
    assert dedup.near_duplicates(rows, threshold=0.95, shingle=3, num_perm=128) == []


def test_dedup_config_problems_are_reported_together() -> None:
    raw = compose([])
    raw["data"]["dedup"].update(near="maybe", near_threshold=0.99, num_perm=8, ngram=0)
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "data.dedup.near", "data.dedup.near_threshold", "data.dedup.ngram", "data.dedup.num_perm"]


# --- contamination ----------------------------------------------------------------


def test_contamination_exact_and_ngram() -> None:
    held = [ex(0, " ".join(WORDS[:12])), ex(1, "what is the capital of france")]
    train = [ex(10, " ".join(WORDS[:10]) + " zzz yyy"),  # 3 of its 6 8-grams occur in held[0]
             ex(11, "What is  the CAPITAL of France", output="Paris"),  # the same prompt, normalized
             ex(12, " ".join(WORDS[12:24]))]  # unrelated
    flags = dedup.contamination(train, held, ngram=8, threshold=0.5)
    assert flags[0] == {"id": "t-10", "reason": "contamination_ngram", "overlap_ratio": 0.5}
    assert flags[1] == {"id": "t-11", "reason": "contamination_exact", "overlaps": "t-1"}
    assert len(flags) == 2


def test_contamination_ignores_an_instruction_shared_by_the_task() -> None:
    shared = "Rewrite the following sentence in the past tense and keep every other word the same please."
    held = [Example("h", "t", "free_text", shared, "I walk home", "I walked home")]
    train = [Example("r", "t", "free_text", shared, "She runs fast", "She ran fast")]
    assert dedup.contamination(train, held, ngram=8, threshold=0.5) == []


def rows_with_leak(tmp_path: Path) -> Path:
    rows = [{"id": f"r{i}", "instruction": f"Explain topic number {i} in a few words please.",
             "output": f"Topic {i} is about {WORDS[i % 26]}."} for i in range(30)]
    rows += [{**rows[i], "id": f"copy{i}", "output": rows[i]["output"] + " Indeed."} for i in range(30)]
    return write_jsonl(tmp_path / "leaky.jsonl", rows)


@pytest.mark.parametrize("action", ["remove", "report", "off"])
def test_prepare_removes_reports_or_ignores_contamination(tmp_path: Path, action: str) -> None:
    # group_by=none: split row by row, so the copies can land on both sides (auto keeps them together)
    cfg = dataclasses.replace(data_cfg(f"data.dedup.contamination={action}", "data.group_by=none"),
                              path=str(rows_with_leak(tmp_path)),
                              task="explain")
    report = prepare.run(config_with(data=cfg, seed=42), prepare.Paths(tmp_path / "out", tmp_path / "stats.json"))
    held = {r["instruction"] for s in ("val", "test") for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    leaked = [r for r in train if r["instruction"] in held]
    found = report["dedup"]["contamination_exact"]["found"]
    if action == "off":
        assert found == 0 and leaked
    else:
        assert found > 0 and report["dedup"]["contamination_exact"]["removed"] == (found if action == "remove" else 0)
        assert (leaked == []) == (action == "remove")
        flagged = read_jsonl(tmp_path / "out" / ("dropped.jsonl" if action == "remove" else "flagged.jsonl"))
        assert {f["id"] for f in flagged if f["reason"] == "contamination_exact"} == (
            {r["id"] for r in leaked} if action == "report" else {f["id"] for f in flagged})
    assert report["kept"] == sum(report["splits"].values())


# --- quarantine (on_error: skip) ---------------------------------------------------


BAD = [{"instruction": "Say hi.", "output": "hi"},
       '{"instruction": "Broken", "output": ',
       {"instruction": "No output here."},
       {"instruction": "Typed", "output": 42}]


def test_skip_quarantines_bad_rows_with_reasons_and_counts_them(tmp_path: Path) -> None:
    good = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(12)]
    path = write_jsonl(tmp_path / "mixed.jsonl", good + BAD)
    cfg = dataclasses.replace(data_cfg("data.on_error=skip"), path=str(path), task="qa")
    report = prepare.run(config_with(data=cfg, seed=0), prepare.Paths(tmp_path / "out", tmp_path / "stats.json"))
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [(q["line"], q["field"]) for q in quarantine] == [(14, None), (15, "output"), (16, "output")]
    assert quarantine[0]["raw"] == BAD[1] and quarantine[0]["reason"].startswith("invalid JSON")
    assert quarantine[1] == {"file": str(path), "line": 15, "field": "output", "reason": "missing", "raw": BAD[2]}
    assert quarantine[2]["reason"] == "expected a string, got int 42"
    assert report["quarantine"] == {"rows": 3, "problems": 3}
    assert report["loaded"] == 13 and report["kept"] == 13  # nothing else disappeared
    assert read_json(tmp_path / "stats.json") == report


def test_fail_is_the_default_and_lists_every_problem(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "q", "output": "a"}] * 3 + BAD)
    cfg = dataclasses.replace(data_cfg(), path=str(path))
    assert cfg.on_error == "fail"
    with pytest.raises(DataError) as info:
        prepare.run(config_with(data=cfg, seed=0), prepare.Paths(tmp_path / "out", tmp_path / "stats.json"))
    assert [(p.line, p.field) for p in info.value.problems] == [(5, None), (6, "output"), (7, "output")]
    assert not (tmp_path / "out").exists()


# --- mixtures -----------------------------------------------------------------------


def part(name: str, n: int, weight: float | None = None, cap: int | None = None) -> mixture.Part:
    return mixture.Part(name, [ex(i, f"{name} {i}", task=name) for i in range(n)], weight, cap)


def test_mixture_sizes_follow_weights_then_caps() -> None:
    assert mixture.sizes([part("a", 100), part("b", 10)]) == [100, 10]
    assert mixture.sizes([part("a", 100, 1.0), part("b", 10, 1.0)]) == [10, 10]
    assert mixture.sizes([part("a", 100, 3.0), part("b", 40, 1.0)]) == [100, 33]
    assert mixture.sizes([part("a", 100, 3.0, cap=30), part("b", 40, 1.0)]) == [30, 33]
    assert mixture.sizes([part("a", 100, cap=5), part("b", 10)]) == [5, 10]


def test_mixture_sampling_is_deterministic_and_per_source() -> None:
    rows, report = mixture.mix([part("a", 50, cap=10), part("b", 20, cap=5)], seed=1)
    again, _ = mixture.mix([part("a", 50, cap=10), part("b", 20, cap=5)], seed=1)
    assert [e.id for e in rows] == [e.id for e in again]
    assert report == {"a": {"loaded": 50, "used": 10}, "b": {"loaded": 20, "used": 5}}
    other, _ = mixture.mix([part("a", 50, cap=10), part("b", 20, cap=7)], seed=1)
    assert [e.id for e in other if e.task == "a"] == [e.id for e in rows if e.task == "a"]  # b's cap leaves a alone
    assert [e.id for e in mixture.mix([part("a", 50, cap=10)], seed=2)[0]] != [e.id for e in rows if e.task == "a"]


def test_mixture_config_is_validated_together() -> None:
    raw = compose(["data=mixture"])
    raw["data"]["sources"] = [{"name": "a", "source": "local", "weight": 1.0},
                              {"name": "a", "source": "web", "path": "x", "cap": 0}]
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    problems = "\n".join(info.value.problems)
    for expected in ("data.sources[0].path: required", "data.sources[1].source: 'web'", "data.sources[1].cap",
                     "name 'a' is used twice", "every source a weight, or none"):
        assert expected in problems


def test_prepare_mixture_of_files_with_own_formats_and_tasks(tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "instruction": f"Add {i} and {i}.", "output": str(2 * i)}
                                                for i in range(40)])
    chats = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "messages": [
        {"role": "user", "content": f"Hello number {i}"}, {"role": "assistant", "content": f"Hi {i}!"}]}
        for i in range(20)])
    raw = compose(["data=mixture"])
    raw["data"]["sources"] = [{"name": "math", "source": "local", "path": str(alpaca), "task": "add", "cap": 30},
                              {"name": "chat", "source": "local", "path": str(chats), "format": "openai_chat",
                               "task": "greet", "task_type": "short_answer"}]
    cfg = from_mapping(raw)
    report = prepare.run(cfg, prepare.Paths(tmp_path / "out", tmp_path / "stats.json", tmp_path / "lengths.png"))
    assert report["sources"] == {"math": {"loaded": 40, "used": 30}, "chat": {"loaded": 20, "used": 20}}
    assert {s: sum(c.values()) for s, c in report["per_source"].items()} == report["splits"]
    assert sum(report["per_source"][s]["chat"] for s in report["splits"]) == 20
    assert report["task_types"] == {"add": "free_text", "greet": "short_answer"}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert {r["id"].split("/")[0] for r in train} == {"math", "chat"} and all("/" in r["id"] for r in train)
    assert next(r for r in train if r["source"] == "chat")["messages"][0]["role"] == "user"
    assert (tmp_path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not SEED_TASKS.is_file(), reason=f"{SEED_TASKS} not present")
def test_the_shipped_mixture_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # its path is relative to the repo root
    cfg = from_mapping(compose(["data=mixture", "data.n_per_task=20"]))
    report = prepare.run(cfg, prepare.Paths(tmp_path / "out", tmp_path / "stats.json"))
    assert report["sources"] == {"embedded": {"loaded": 80, "used": 80},
                                 "self_instruct_seed": {"loaded": 175, "used": 100}}

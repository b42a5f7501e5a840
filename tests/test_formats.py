"""Loading raw instruction data: every format, auto-detection, column mapping, the hub path,
and malformed inputs that must surface as one DataError naming file:line: field."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.formats import FORMATS, load_file, load_hub
from pipeline.data.schema import TASK_TYPES, DataError, Example

SHARED = Path(__file__).parents[2] / "shared"
SELF_INSTRUCT = SHARED / "data" / "self-instruct"
needs_shared = pytest.mark.skipif(not SELF_INSTRUCT.is_dir(), reason=f"{SELF_INSTRUCT} not present")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def error_text(path: Path, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_file(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ each format


def test_alpaca_jsonl_defaults(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "tiny.jsonl", [
        {"instruction": "Add.", "input": "1 2", "output": "3", "lang": "en"},
        {"instruction": "Greet.", "output": "Hi"},
    ])
    first, second = load_file(path)
    assert first == Example("tiny-1", "tiny", "free_text", "Add.", "1 2", "3", "tiny.jsonl", {"lang": "en"})
    assert (second.id, second.input, second.meta) == ("tiny-2", "", {})


def test_alpaca_json_array_reports_real_lines(tmp_path: Path) -> None:
    rows = [{"id": 7, "instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}]
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    message = error_text(path)
    assert f"{path}:7: output: is empty" in message  # the second object starts on line 7
    rows[1]["output"] = "d"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert [e.id for e in load_file(path)] == ["7", "arr-7"]


def test_json_file_with_one_object_per_line_is_read_as_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"instruction": "a", "output": "b"}] * 2)
    assert len(load_file(path)) == 2


def test_dolly_category_becomes_task(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Q?", "context": "ctx", "response": "A", "category": "closed_qa"},
    ])
    (ex,) = load_file(path)
    assert (ex.task, ex.input, ex.output, ex.meta) == ("closed_qa", "ctx", "A", {})
    (ex,) = load_file(path, task="mine", task_type="short_answer")
    assert (ex.task, ex.task_type, ex.meta) == ("mine", "short_answer", {"category": "closed_qa"})


def test_prompt_completion_strips_markers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "  Review: good.\n\nPositive?\n", "completion": " Yes<|endoftext|>"},
        {"prompt": "x", "completion": "No </s>\n"},
        {"prompt": "y", "completion": "Maybe<|im_end|><|eot_id|>"},
    ])
    examples = load_file(path)
    assert [(e.instruction, e.input, e.output) for e in examples] == [
        ("Review: good.\n\nPositive?", "", "Yes"), ("x", "", "No"), ("y", "", "Maybe")]


def test_self_instruct_seed_one_example_per_instance(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "seed.jsonl", [
        {"id": "s0", "name": "sentiment", "instruction": "Label it.", "is_classification": True,
         "instances": [{"input": "great", "output": "positive"}, {"input": "bad", "output": "negative"}]},
        {"id": "s1", "instruction": "Tell a joke.", "instances": [{"input": "", "output": "Knock knock."}]},
    ])
    a, b, c = load_file(path)
    assert (a.id, a.task, a.task_type, a.output) == ("s0-0", "sentiment", "classification", "positive")
    assert (b.id, b.input) == ("s0-1", "bad")
    assert (c.id, c.task, c.task_type) == ("s1-0", "seed", "free_text")
    assert load_file(path, task_type="short_answer")[0].task_type == "short_answer"


def test_row_task_type_is_validated(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b", "task_type": "poem"}])
    assert f"{path}:1: task_type: 'poem' is not one of" in error_text(path)
    assert "task_type: 'poem'" in error_text(path, task_type="poem")


@needs_shared
@pytest.mark.parametrize("name, count", [("seed_tasks.jsonl", 175), ("user_oriented_instructions.jsonl", 252)])
def test_real_self_instruct_files(name: str, count: int) -> None:
    examples = load_file(SELF_INSTRUCT / name)
    assert len(examples) == count and len({e.id for e in examples}) == count
    assert all(e.output.strip() and e.task_type in TASK_TYPES for e in examples)
    if name == "seed_tasks.jsonl":
        assert {e.task_type for e in examples} == {"classification", "free_text"}
    else:  # no name/is_classification: task falls back to the file stem, motivation_app lands in meta
        assert examples[0].task == "user_oriented_instructions" and "motivation_app" in examples[0].meta


@needs_shared
def test_real_t0_files() -> None:
    files = sorted((SELF_INSTRUCT / "t0").glob("*.jsonl"))
    assert len(files) == 4
    for path in files:
        examples = load_file(path)
        assert len(examples) == 200
        assert not any("<|endoftext|>" in e.output or not e.output for e in examples)
        assert examples[0].task == path.stem


# ------------------------------------------------------------------ detection


def test_unknown_format_lists_keys_and_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    message = error_text(path)
    assert f"{path}:1: cannot detect the format from keys ['answer', 'question']" in message
    assert all(name in message for name in FORMATS if name != "auto")


def test_ambiguous_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "amb.jsonl", [{"instruction": "i", "output": "o", "response": "r"}])
    assert "ambiguous format" in error_text(path) and "alpaca, dolly" in error_text(path)
    assert load_file(path, format="dolly")[0].meta == {"output": "o"}


def test_explicit_format_reports_missing_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "i", "output": "o"}])
    assert f"{path}:1: completion: missing" in error_text(path, format="prompt_completion")
    assert f"{path}:1: conversations: missing" in error_text(path, format="sharegpt")
    with pytest.raises(ValueError, match="unknown format"):
        load_file(path, format="vicuna")


# ------------------------------------------------------------------ column mapping


COLUMNS = {"instruction": "question", "output": "answer"}


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_tsv_with_column_mapping(tmp_path: Path, suffix: str, delimiter: str) -> None:
    path = write_table(tmp_path / f"qa{suffix}", ["question", "answer", "source_url"],
                       [["Capital of France?", "Paris", "u1"], ["Multi\nline?", "Yes, two\nlines", "u2"],
                        ["Empty?", "", "u3"]], delimiter)
    message = error_text(path, columns=COLUMNS)
    assert f"{path}:6: output (column 'answer'): is empty" in message  # row 2 spans lines 3-5
    path.write_text(path.read_text(encoding="utf-8").replace("Empty?", "Full?").replace(
        f"Full?{delimiter}{delimiter}", f"Full?{delimiter}ok{delimiter}"), encoding="utf-8")
    examples = load_file(path, columns=COLUMNS)
    assert [(e.id, e.instruction, e.output) for e in examples][:2] == [
        ("qa-2", "Capital of France?", "Paris"), ("qa-3", "Multi\nline?", "Yes, two\nlines")]
    assert examples[0].meta == {"source_url": "u1"}


def test_csv_row_with_too_many_cells(tmp_path: Path) -> None:
    path = write_table(tmp_path / "w.csv", ["instruction", "output"], [["a", "b"], ["c", "d", "e"]])
    assert f"{path}:3: 3 cells but the header has 2" in error_text(path)


def test_parquet_with_column_mapping(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", None], "n": [1, 2]}), path)
    assert f"{path}:2: output (column 'answer'): is null" in error_text(path, columns=COLUMNS)
    pq.write_table(pa.table({"question": ["q1"], "answer": ["a1"], "n": [1]}), path)
    (ex,) = load_file(path, columns=COLUMNS)
    assert (ex.id, ex.instruction, ex.output, ex.meta) == ("qa-1", "q1", "a1", {"n": 1})


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    assert "cannot read parquet" in error_text(path)


# ------------------------------------------------------------------ hub path


def test_hub_from_save_to_disk(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = {"question": ["q1", "q2"], "answer": ["a1", "a2"], "category": ["x", "y"]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"test": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))

    single = load_hub(str(tmp_path / "single"), columns=COLUMNS)
    assert [(e.id, e.instruction, e.output, e.meta) for e in single] == [
        ("single-train-1", "q1", "a1", {"category": "x"}), ("single-train-2", "q2", "a2", {"category": "y"})]
    assert single[0].source == str(tmp_path / "single")
    dolly = load_hub(str(tmp_path / "dd"), split="test", columns={"instruction": "question", "response": "answer"})
    assert [e.task for e in dolly] == ["x", "y"]
    with pytest.raises(DataError, match="no split 'train'"):
        load_hub(str(tmp_path / "dd"))


def test_hub_rows_are_validated_like_files(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict({"instruction": ["a", "b"], "output": ["ok", " "]}).save_to_disk(str(tmp_path / "ds"))
    assert f"{tmp_path / 'ds'}:2: output: is empty" in str(pytest.raises(DataError, load_hub, str(tmp_path / "ds")).value)


# ------------------------------------------------------------------ malformed inputs


def test_truncated_json_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp\n', encoding="utf-8")
    assert f"{path}:2: invalid JSON: Unterminated string" in error_text(path)


def test_truncated_json_array(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n', encoding="utf-8")
    assert f"{path}:4: invalid JSON" in error_text(path)
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n]', encoding="utf-8")
    assert f"{path}:3: invalid JSON: trailing comma" in error_text(path)


def test_json_that_is_not_an_array(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2), encoding="utf-8")
    assert f"{path}:1: expected a JSON array of objects" in error_text(path)


def test_non_object_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "a", "output": "b"}, ["a", "b"], "text"])
    message = error_text(path)
    assert f"{path}:2: expected an object, got list" in message and f"{path}:3: expected an object" in message


def test_wrong_field_types_are_not_coerced(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"instruction": "a", "output": 42}, {"instruction": ["a"], "output": "b"},
        {"instruction": "a", "input": None, "output": "b"}, {"id": 1.5, "instruction": "a", "output": "b"}])
    message = error_text(path)
    assert f"{path}:1: output: expected a string, got int 42" in message
    assert f"{path}:2: instruction: expected a string, got list" in message
    assert f"{path}:4: id: expected a string or integer, got float" in message
    assert ":3:" not in message  # a null optional input is just empty


def test_seed_instance_problems_name_the_instance(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "instruction": "i", "instances": [{"input": "", "output": "ok"}, {"input": "", "output": 3}]},
        {"id": "b", "instruction": "i", "instances": []},
        {"id": "c", "instruction": "i", "instances": [{"output": "x"}], "is_classification": "yes"}])
    message = error_text(path)
    assert f"{path}:1: instances[1].output: expected a string, got int" in message
    assert f"{path}:2: instances: expected a non-empty list" in message
    assert f"{path}:3: is_classification: expected true/false" in message


def test_empty_outputs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "  \n"}])
    assert f"{path}:1: output: is empty" in error_text(path)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": " <|endoftext|>"}])
    assert f"{path}:1: completion: is empty once end-of-text markers are removed" in error_text(path)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    bad = '{"instruction": "caf\u00e9", "output": "b"}'.encode("latin-1")  # 0xe9 is column 21
    for suffix, first, last in [(".jsonl", b'{"instruction": "a", "output": "b"}', b""),
                                (".json", b"[", b"]"), (".csv", b"instruction,output", b"")]:
        path = tmp_path / f"latin1{suffix}"
        path.write_bytes(first + b"\n" + bad + b"\n" + last)
        assert f"{path}:2: not valid UTF-8: byte 0xe9 at column 21" in error_text(path)


def test_field_too_long(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "a", "output": "x" * 100_000}])
    assert f"{path}:1: output: is 100000 characters long, more than max_field_chars=20000" in error_text(path)
    assert len(load_file(path, max_field_chars=100_000)[0].output) == 100_000


def test_duplicate_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "x", "instruction": "a", "output": "b"}, {"id": "y", "instruction": "a", "output": "b"},
        {"id": "x", "instruction": "c", "output": "d"}])
    assert f"{path}:3: id: duplicate id 'x' (first at line 1)" in error_text(path)


@pytest.mark.parametrize("suffix, content", [(".jsonl", ""), (".jsonl", "\n \n"), (".json", "[]"), (".csv", "instruction,output\n")])
def test_empty_file(tmp_path: Path, suffix: str, content: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    assert f"{path}: the file has no rows" in error_text(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello", encoding="utf-8")
    assert "unsupported file type '.txt'" in error_text(path)


def test_problem_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": ""}] * 25)
    with pytest.raises(DataError) as info:
        load_file(path, max_problems=20)
    assert len(info.value.problems) == 20 and info.value.truncated
    assert "stopped after this many problems" in str(info.value)


# ------------------------------------------------------------------ property

KNOWN_KEYS = ["id", "instruction", "input", "output", "response", "context", "category", "prompt",
              "completion", "instances", "name", "is_classification", "task", "task_type", "conversations",
              "messages"]
scalar = st.one_of(st.text(max_size=20), st.integers(), st.none())
instance = st.dictionaries(st.sampled_from(["input", "output"]), st.one_of(st.text(min_size=1), scalar))
value = st.one_of(st.text(min_size=1), scalar, st.lists(st.one_of(scalar, instance), max_size=3),
                  st.lists(instance, min_size=1, max_size=3))
random_row = st.dictionaries(st.sampled_from(KNOWN_KEYS), value, max_size=8)
good_instance = st.fixed_dictionaries({"input": st.text(), "output": st.text(min_size=1)})


def turn(role_key: str, text_key: str, roles: list[str]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries({role_key: st.sampled_from(roles), text_key: st.one_of(st.text(min_size=1), scalar)})


def likely_valid(key: str) -> st.SearchStrategy[Any]:
    good = {"instances": st.lists(good_instance, min_size=1, max_size=2),
            "messages": st.lists(turn("role", "content", ["user", "assistant", "system", "bot"]), min_size=1,
                                 max_size=4),
            "conversations": st.lists(turn("from", "value", ["human", "gpt", "system", "x"]), min_size=1,
                                      max_size=4)}.get(key, st.text(min_size=1))
    # Mostly well-typed, sometimes anything (one_of would flatten `value` and drown `good`).
    return st.sampled_from([good, good, good, value]).flatmap(lambda strategy: strategy)
# Rows shaped like one format (its identifying keys present) so the success path is exercised too.
shaped_row = st.sampled_from([("instruction", "output"), ("instruction", "response"), ("prompt", "completion"),
                              ("instruction", "instances"), ("messages",), ("conversations",)]).flatmap(
    lambda keys: st.builds(lambda base, extra: {**extra, **base},
                           st.fixed_dictionaries({k: likely_valid(k) for k in keys}),
                           st.dictionaries(st.sampled_from(KNOWN_KEYS), value, max_size=2)))
row = st.one_of(random_row, *[shaped_row] * 4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, max_size=3), fmt=st.sampled_from(FORMATS + ("auto",) * 3))
def test_random_rows_load_or_raise_data_error(tmp_path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    path = write_jsonl(tmp_path / "random.jsonl", rows)
    try:
        examples = load_file(path, format=fmt)
    except DataError:
        return
    for ex in examples:
        assert all(isinstance(getattr(ex, f), str) for f in ("id", "task", "task_type", "instruction", "input", "output"))
        assert ex.output.strip() and ex.task_type in TASK_TYPES
        json.dumps(ex.meta)
        if ex.messages is not None:
            assert ex.messages[-1] == {"role": "assistant", "content": ex.output}
            assert ex.instruction == next(m["content"] for m in ex.messages if m["role"] == "user")

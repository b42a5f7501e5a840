"""Truncation that keeps the template: only the user content is cut (its end, or its middle), the row is
re-rendered and tokenized like any other, and a row that cannot fit is dropped with its reason.

The plain reference for a truncated row is the tokenizer's own call on the re-rendered text with the
shortened input: equal ids mean the template's tokens, the instruction and the answer are intact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import SHARED
from pipeline import render
from pipeline.core.config import ConfigError, from_mapping
from pipeline.core.files import write_jsonl
from pipeline.core.models import IGNORE_INDEX, load_tokenizer
from pipeline.params import compose
from pipeline.prompting.pieces import reference_encode
from pipeline.prompting.rows import MARK, tokenize_split
from pipeline.prompting.shots import ShotPool
from pipeline.prompting.templates import Template, make_template, segments

WORDS = " ".join(f"word{i}" for i in range(300))  # about 600 tokens of input
T0 = SHARED / "data" / "self-instruct" / "t0"


def example(i: int, input: str = WORDS, output: str = "positive", task: str = "sentiment") -> dict:
    return {"id": f"ex-{i}", "task": task, "task_type": "classification",
            "instruction": "Classify the sentiment of the review.", "input": input, "output": output}


def reference_row(tokenizer, ex: dict, template: Template, shots=()) -> tuple[list[int], str]:
    """Ids of the whole rendered text through the tokenizer's own call, and the prompt text."""
    parts = segments(ex, template, shots)
    ids = reference_encode(tokenizer, [parts[0][0]], True)[0]
    ids += [t for p in reference_encode(tokenizer, [t for t, _ in parts[1:]], False) for t in p]
    return ids, "".join(t for t, _ in parts[:-1])


def shortened_input(prompt: str, ex: dict) -> str:
    """The input a chat prompt holds: between the instruction's blank line and the end of the user turn."""
    start = prompt.index(ex["instruction"] + "\n\n") + len(ex["instruction"]) + 2
    return prompt[start:prompt.index("<|im_end|>", start)]


def test_truncated_row_is_the_rerendered_text_with_the_input_cut_at_its_end(tokenizer, chat) -> None:
    rows, report = tokenize_split([example(0)], chat, tokenizer, max_length=128, overflow="truncate")
    assert report["truncated"] == 1 and report["dropped"] == 0
    row = rows[0]
    short = shortened_input(row["prompt"], example(0))
    assert WORDS.startswith(short) and len(short) < len(WORDS)
    ids, prompt = reference_row(tokenizer, {**example(0), "input": short}, chat)
    assert row["input_ids"] == ids and row["prompt"] == prompt
    assert 120 <= len(ids) <= 128  # cut on token boundaries, close to the limit
    assert row["prompt"].startswith("<|im_start|>system\n")
    assert row["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "positive<|im_end|>"


def test_middle_keeps_both_ends_of_the_input(tokenizer, chat) -> None:
    rows, report = tokenize_split([example(0)], chat, tokenizer, max_length=128, overflow="truncate", side="middle")
    short = shortened_input(rows[0]["prompt"], example(0))
    head, tail = short.split(MARK)
    assert WORDS.startswith(head) and WORDS.endswith(tail) and head and tail
    assert rows[0]["input_ids"] == reference_row(tokenizer, {**example(0), "input": short}, chat)[0]
    assert len(rows[0]["input_ids"]) <= 128 and report["truncated"] == 1


def test_a_row_whose_template_and_answer_alone_do_not_fit_is_dropped_with_its_reason(tokenizer, chat) -> None:
    long_answer = example(1, input="short", output=" ".join(["yes"] * 20))
    rows, report = tokenize_split([example(0), long_answer], chat, tokenizer, max_length=40, overflow="truncate")
    assert rows == [] and report["dropped"] == 2
    reasons = {d["id"]: d["reason"] for d in report["dropped_rows"]}
    assert "user content cut to nothing" in reasons["ex-0"] and "max_length=40" in reasons["ex-1"]


def test_prompt_completion_rows_cut_their_only_user_text(tokenizer, chat) -> None:
    ex = {**example(0, input=""), "instruction": "Read this: " + WORDS + "\nIs it positive?"}
    rows, _ = tokenize_split([ex], chat, tokenizer, max_length=100, overflow="truncate", side="middle")
    assert rows[0]["prompt"].startswith("<|im_start|>system\n") and "Read this:" in rows[0]["prompt"]
    assert "Is it positive?<|im_end|>" in rows[0]["prompt"] and len(rows[0]["input_ids"]) <= 100


def test_kshot_prompts_keep_every_exemplar_whole(tokenizer, chat) -> None:
    train = [example(10 + i, input=f"review number {i} was fine", output="positive") for i in range(3)]
    kshot = dataclasses.replace(chat, k_shot=2)
    pool = ShotPool(train)
    rows, report = tokenize_split([example(0)], kshot, tokenizer, max_length=200, overflow="truncate", pool=pool)
    shots = pool.draw(example(0), 2, kshot.shot_seed)
    prompt = rows[0]["prompt"]
    assert all(s["input"] in prompt for s in shots) and report["truncated"] == 1
    short = prompt[prompt.rindex(example(0)["instruction"] + "\n\n") + len(example(0)["instruction"]) + 2:]
    short = short[:short.index("<|im_end|>")]
    assert rows[0]["input_ids"] == reference_row(tokenizer, {**example(0), "input": short}, kshot, shots)[0]


def test_warnings_name_tasks_with_more_than_5_percent_truncated() -> None:
    report = {"train": {"truncated_by_task": {"news": {"truncated": 28, "rows": 100},
                                              "qa": {"truncated": 5, "rows": 100}}}}
    warnings = render.truncation_warnings(report)
    assert len(warnings) == 1 and warnings[0].startswith("train: task news: 28/100 rows (28%) truncated")


def test_render_reports_warnings_and_auto_max_length(tmp_path: Path, smoke_base: Path, smoke_cfg, capsys) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    train = [example(i, input=" ".join(["word"] * (5 + i))) for i in range(100)]
    for split, rows in {"train": train, "val": train[:2], "test": [example(200)]}.items():
        write_jsonl(prepared / f"{split}.jsonl", rows)
    cfg = dataclasses.replace(smoke_cfg, prompt=dataclasses.replace(smoke_cfg.prompt, max_length="auto"))
    report = render.run(cfg, render.Paths(prepared, smoke_base, tmp_path / "out", tmp_path / "render.json"))
    chat = make_template(cfg.prompt, *(lambda t: (t.chat_template, t.bos_token, t.eos_token))(load_tokenizer(smoke_base)))
    lengths = sorted(len(reference_row(load_tokenizer(smoke_base), ex, chat)[0]) for ex in train)
    assert report["max_length"] == lengths[98]  # nearest-rank 99th percentile of 100 rows
    assert report["splits"]["train"]["truncated"] == 1  # the longest row
    assert any(w.startswith("test: task sentiment: 1/1 rows") for w in report["warnings"])
    assert "render: warning: test: task sentiment" in capsys.readouterr().out


@pytest.mark.parametrize("override, key", [("prompt.truncate_side=left", "prompt.truncate_side"),
                                           ("prompt.max_length=big", "prompt.max_length")])
def test_new_keys_are_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_mapping(compose([override]))


@pytest.mark.skipif(not T0.is_dir(), reason="the shared T0 files are absent")
def test_t0_mixture_truncated_rows_keep_the_template(tokenizer, chat) -> None:
    from pipeline.data.formats import load_file

    examples = [e.to_dict() for path in sorted(T0.glob("*.jsonl")) for e in load_file(path)[:40]]
    rows, report = tokenize_split(examples, chat, tokenizer, max_length=256, overflow="truncate")
    full = tokenize_split(examples, chat, tokenizer, max_length=100_000, overflow="truncate")[0]
    assert report["truncated"] > 0
    assert report["truncated"] + report["dropped"] == sum(len(r["input_ids"]) > 256 for r in full)
    by_id = {e["id"]: e for e in examples}
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>system\n") and len(row["input_ids"]) <= 256
        assert row["completion"] == by_id[row["id"]]["output"] + "<|im_end|>"
    print(f"T0: {report['truncated']}/{len(examples)} truncated with the template intact, {report['dropped']} dropped")

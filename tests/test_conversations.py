"""Every format, loaded and rendered with the real SmolLM2 tokenizer: multi-turn ShareGPT and OpenAI
chats learn exactly their assistant turns (all, or the last by config), and the real self-instruct
files render with exact masks too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import SHARED
from pipeline.data.formats import load_file
from pipeline.data.schema import DataError
from pipeline.core.models import IGNORE_INDEX
from pipeline.params import compose
from pipeline.core.config import from_mapping
from pipeline.prompting.templates import PromptError, make_template, segments
from pipeline.prompting.rows import tokenize_split

SELF_INSTRUCT = SHARED / "data" / "self-instruct"
REAL_FILES = ["seed_tasks.jsonl", "user_oriented_instructions.jsonl",
              *(f"t0/{p.name}" for p in sorted((SELF_INSTRUCT / "t0").glob("*.jsonl")))]

TURNS = [("user", "Hi there."), ("assistant", "Hello! How can I help?"), ("user", "What is 2 + 2?"),
         ("assistant", "4"), ("user", "And times 3?"), ("assistant", "12, since 4 x 3 = 12.")]
SHAREGPT = {"id": "c1", "conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": t}
                                          for r, t in TURNS]}
OPENAI = {"id": "c2", "messages": [{"role": "system", "content": "Be terse."}] +
          [{"role": r, "content": t} for r, t in TURNS[:4]]}


def template(tokenizer, option: str = "chat", **changes):
    cfg = dataclasses.replace(from_mapping(compose([f"prompt={option}"])).prompt, **changes)
    return make_template(cfg, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)


def learnt_runs(row: dict) -> list[list[int]]:
    """Maximal runs of consecutive label tokens."""
    runs, current = [], []
    for tok, label in zip(row["input_ids"], row["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == tok
            current.append(tok)
    return runs + ([current] if current else [])


def assert_exact(tokenizer, row: dict, answers: list[str], end: str = "<|im_end|>") -> None:
    """The labels decode to exactly these assistant turns, each with its end-of-turn token, and
    the whole row is the tokenization of the rendered text."""
    assert [tokenizer.decode(run) for run in learnt_runs(row)] == [a + end for a in answers]
    assert row["input_ids"] == tokenizer(row["prompt"] + row["completion"])["input_ids"]


@pytest.mark.parametrize("raw", [SHAREGPT, OPENAI], ids=["sharegpt", "openai_chat"])
def test_conversation_formats_load(tmp_path: Path, raw: dict) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(raw) + "\n", encoding="utf-8")
    (ex,) = load_file(path)
    assert ex.messages[-1] == {"role": "assistant", "content": ex.output}
    assert ex.instruction == "Hi there." and ex.input == ""
    assert [m["role"] for m in ex.messages if m["role"] != "system"] == ["user", "assistant"] * (len(ex.messages) // 2)


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("option", ["chat", "chatml"])
def test_multi_turn_masks_are_exact(tmp_path: Path, tokenizer, option: str, train_on: str) -> None:
    rows = [load_file(_one(tmp_path, raw))[0].to_dict() for raw in (SHAREGPT, OPENAI)]
    tmpl = template(tokenizer, option, train_on=train_on)
    out, report = tokenize_split(rows, tmpl, tokenizer, max_length=512, overflow="truncate")
    for ex, row in zip(rows, out):
        answers = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        assert_exact(tokenizer, row, answers if train_on == "all_assistant" else answers[-1:])
        assert row["completion"] == answers[-1] + "<|im_end|>"
    # The test split (what evaluate generates from) always learns only the last answer.
    test_rows, _ = tokenize_split(rows, tmpl, tokenizer, max_length=512, overflow="truncate", last_only=True)
    assert_exact(tokenizer, test_rows[0], [TURNS[-1][1]])
    assert "Be terse." in out[1]["prompt"] and "named SmolLM" not in out[1]["prompt"]  # the data's system turn


def _one(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / f"{raw['id']}.jsonl"
    path.write_text(json.dumps(raw) + "\n", encoding="utf-8")
    return path


def test_chatml_renders_the_exact_text(tmp_path: Path, tokenizer) -> None:
    ex = load_file(_one(tmp_path, OPENAI))[0].to_dict()
    text = "".join(t for t, _ in segments(ex, template(tokenizer, "chatml")))
    assert text == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi there.<|im_end|>\n"
                    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                    "<|im_end|>\n<|im_start|>assistant\n4<|im_end|>")


def test_jinja_templates_refuse_conversations_clearly(tmp_path: Path, tokenizer) -> None:
    ex = load_file(_one(tmp_path, SHAREGPT))[0].to_dict()
    with pytest.raises(PromptError, match=r"prompt=alpaca: example 'c1' is a 6-turn conversation.*prompt=chatml"):
        segments(ex, template(tokenizer, "alpaca"))


def test_truncation_cuts_only_the_last_user_turn(tmp_path: Path, tokenizer) -> None:
    ex = load_file(_one(tmp_path, SHAREGPT))[0].to_dict()
    full, _ = tokenize_split([ex], template(tokenizer), tokenizer, max_length=512, overflow="truncate")
    n = len(full[0]["input_ids"])
    cut, report = tokenize_split([ex], template(tokenizer), tokenizer, max_length=n - 2, overflow="truncate")
    assert report["truncated"] == 1 and len(cut[0]["input_ids"]) <= n - 2
    last_user = max(i for i, t in enumerate(ex["messages"]) if t["role"] == "user")
    earlier = ex["messages"][:last_user]
    # Every earlier turn (and the template around them) is untouched; the last answer is whole.
    before = tokenize_split([{**ex, "messages": earlier + [{"role": "user", "content": "x"},
                                                           ex["messages"][-1]]}],
                            template(tokenizer), tokenizer, max_length=512, overflow="truncate")[0][0]["prompt"]
    assert cut[0]["prompt"].startswith(before[:before.rindex("x")])
    assert cut[0]["completion"] == full[0]["completion"]
    answer = [t for t in full[0]["labels"][-len(full[0]["labels"]) // 4:] if t != -100]
    assert [t for t in cut[0]["labels"][-len(full[0]["labels"]) // 4:] if t != -100][-len(answer):] == answer


def test_bad_conversations_name_the_turn(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_file(path, format="sharegpt")
    assert f"{path}:1: conversations[1].from: str 'robot' is not one of" in str(info.value)
    assert f"{path}:2: conversations: missing" in str(info.value)


@pytest.mark.skipif(not SELF_INSTRUCT.is_dir(), reason=f"{SELF_INSTRUCT} not present")
@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.parametrize("option", ["chat", "alpaca"])
def test_real_files_render_with_exact_masks(tokenizer, name: str, option: str) -> None:
    examples = [e.to_dict() for e in load_file(SELF_INSTRUCT / name)]
    tmpl = template(tokenizer, option)
    rows, report = tokenize_split(examples, tmpl, tokenizer, max_length=100_000, overflow="truncate")
    assert len(rows) == len(examples) and report["dropped"] == report["truncated"] == 0
    end = "<|im_end|>"
    for ex, row in zip(examples, rows):
        (run,) = learnt_runs(row)
        assert tokenizer.decode(run) == ex["output"] + end
        n_prompt = len(row["input_ids"]) - len(run)
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert tokenizer.decode(row["input_ids"][:n_prompt]) == row["prompt"]

"""Tokenizing and masking with the real SmolLM2 tokenizer: exact label masks, overflow handling,
and the render stage's files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline import render
from pipeline.core.files import read_json, read_jsonl, write_jsonl
from pipeline.core.models import IGNORE_INDEX
from pipeline.prompting.templates import Template
from pipeline.prompting.templates import render as render_text
from pipeline.prompting.rows import tokenize_split


def example(i: int, output: str = "positive", input: str = "The food was great.") -> dict:
    return {"id": f"ex-{i}", "task": "sentiment", "task_type": "classification",
            "instruction": "Classify the sentiment of the review.", "input": input, "output": output}


EXAMPLES = [example(0), example(1, "negative", "Cold soup, rude staff."), example(2, "It is fine.", "")]


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_labels_mask_exactly_the_prompt(tokenizer, chat) -> None:
    rows, report = tokenize_split(EXAMPLES, chat, tokenizer, max_length=256, overflow="truncate")
    assert [r["id"] for r in rows] == ["ex-0", "ex-1", "ex-2"]
    for ex, row in zip(EXAMPLES, rows):
        prompt, completion = render_text(ex, chat)
        p_ids, c_ids = ids(tokenizer, prompt), ids(tokenizer, completion, special=False)
        assert (row["prompt"], row["completion"]) == (prompt, completion)
        assert row["input_ids"] == p_ids + c_ids
        assert row["labels"] == [IGNORE_INDEX] * len(p_ids) + c_ids
        assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == ex["output"] + "<|im_end|>"
    assert report["truncated"] == report["dropped"] == 0 and report["dropped_rows"] == []


def test_report_counts_tokens_and_loss_fraction(tokenizer, chat) -> None:
    rows, report = tokenize_split(EXAMPLES, chat, tokenizer, max_length=256, overflow="truncate")
    pairs = [render_text(ex, chat) for ex in EXAMPLES]
    prompt_lens = [len(ids(tokenizer, p)) for p, _ in pairs]
    completion_lens = [len(ids(tokenizer, c, special=False)) for _, c in pairs]
    lengths = sorted(p + c for p, c in zip(prompt_lens, completion_lens))
    assert report["rows"] == 3
    assert report["tokens"] == sum(lengths)
    assert report["loss_token_fraction"] == pytest.approx(sum(completion_lens) / sum(lengths), abs=1e-12)
    assert report["max_length_seen"] == lengths[-1]
    assert report["median_length"] == lengths[1]
    # "positive<|im_end|>" is two tokens, so the hand count is easy to read off
    assert completion_lens[0] == 2


def test_empty_split_reports_zeros(tokenizer, chat) -> None:
    rows, report = tokenize_split([], chat, tokenizer, max_length=256, overflow="truncate")
    assert rows == []
    assert report == {"rows": 0, "tokens": 0, "loss_token_fraction": 0.0, "max_length_seen": 0,
                      "median_length": 0, "truncated": 0, "truncated_by_task": {}, "dropped": 0,
                      "dropped_rows": []}


def test_truncate_cuts_the_input_and_keeps_template_instruction_and_completion(tokenizer, chat) -> None:
    prompt, completion = render_text(EXAMPLES[0], chat)
    p_ids, c_ids = ids(tokenizer, prompt), ids(tokenizer, completion, special=False)
    max_length = len(p_ids) + len(c_ids) - 2
    rows, report = tokenize_split(EXAMPLES[:1], chat, tokenizer, max_length=max_length, overflow="truncate")
    assert report["truncated"] == 1 and report["dropped"] == 0
    short = {**EXAMPLES[0], "input": "The food was"}  # "The food was great." less its last two tokens
    s_prompt, s_completion = render_text(short, chat)
    assert (rows[0]["prompt"], rows[0]["completion"]) == (s_prompt, completion)
    assert rows[0]["input_ids"] == ids(tokenizer, s_prompt) + c_ids
    assert rows[0]["labels"] == [IGNORE_INDEX] * len(ids(tokenizer, s_prompt)) + c_ids
    assert len(rows[0]["input_ids"]) <= max_length


def test_drop_removes_over_long_rows_and_says_why(tokenizer, chat) -> None:
    prompt, completion = render_text(EXAMPLES[0], chat)
    too_long = len(ids(tokenizer, prompt)) + len(ids(tokenizer, completion, special=False)) - 1
    rows, report = tokenize_split(EXAMPLES, chat, tokenizer, max_length=too_long, overflow="drop")
    assert "ex-0" not in [r["id"] for r in rows]
    assert {"id": "ex-0", "reason": f"longer than max_length={too_long}"} in report["dropped_rows"]
    assert report["dropped"] == len(report["dropped_rows"]) == 3 - len(rows)
    assert report["truncated"] == 0


def test_completion_longer_than_max_length_is_dropped_even_when_truncating(tokenizer, chat) -> None:
    long = example(9, output=" ".join(["word"] * 80))
    prompt, completion = render_text(EXAMPLES[0], chat)
    limit = len(ids(tokenizer, prompt)) + len(ids(tokenizer, completion, special=False)) - 2
    rows, report = tokenize_split([EXAMPLES[0], long], chat, tokenizer, max_length=limit, overflow="truncate")
    assert [r["id"] for r in rows] == ["ex-0"]
    assert report["dropped_rows"] == [{"id": "ex-9", "reason": f"longer than max_length={limit}"}]
    assert report["truncated"] == 1  # ex-0's input is cut to fit


def test_run_writes_every_split_and_the_template(tmp_path: Path, smoke_base: Path, smoke_cfg) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, rows in {"train": EXAMPLES, "val": EXAMPLES[:1], "test": EXAMPLES[1:]}.items():
        write_jsonl(prepared / f"{split}.jsonl", rows)
    out, report_path = tmp_path / "rendered", tmp_path / "report" / "render.json"
    report = render.run(smoke_cfg, render.Paths(prepared, smoke_base, out, report_path))

    # With prompt.eval_k_shot > 0 (the default) the base model's k-shot arm is rendered beside the splits.
    assert sorted(p.name for p in out.iterdir()) == ["template.json", "template_kshot.json", "test.jsonl",
                                                     "test_kshot.jsonl", "train.jsonl", "val.jsonl"]
    saved = read_json(out / "template.json")
    assert saved["hash"] == report["template_hash"] == Template.from_dict(saved).hash()
    assert read_json(report_path) == report
    assert {s: r["rows"] for s, r in report["splits"].items()} == {"train": 3, "val": 1, "test": 2}
    assert [r["id"] for r in read_jsonl(out / "test.jsonl")] == ["ex-1", "ex-2"]


def test_run_with_another_template_changes_the_hash(tmp_path: Path, smoke_base: Path, smoke_cfg) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split in render.SPLITS:
        write_jsonl(prepared / f"{split}.jsonl", EXAMPLES)
    chat = render.run(smoke_cfg, render.Paths(prepared, smoke_base, tmp_path / "a", tmp_path / "a.json"))
    plain_cfg = dataclasses.replace(smoke_cfg.prompt, name="plain", kind="jinja", template="{{ instruction }}\nAnswer:",
                                    max_length=64, overflow="drop")
    plain = render.run(dataclasses.replace(smoke_cfg, prompt=plain_cfg), render.Paths(prepared, smoke_base, tmp_path / "b", tmp_path / "b.json"))
    assert chat["template_hash"] != plain["template_hash"]
    assert read_jsonl(tmp_path / "b" / "train.jsonl")[0]["prompt"] == "Classify the sentiment of the review.\nAnswer:"


# --- prompt design: a user's template file, k-shot exemplars --------------------------


def write_prepared(tmp_path: Path, splits: dict[str, list[dict]]) -> Path:
    prepared = tmp_path / "prepared"
    prepared.mkdir(exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(prepared / f"{split}.jsonl", rows)
    return prepared


def test_template_file_is_read_by_the_entry_point_and_hashed_by_content(tmp_path: Path, smoke_base: Path,
                                                                         smoke_cfg) -> None:
    import yaml

    from pipeline.params import compose

    prepared = write_prepared(tmp_path, {"train": EXAMPLES, "val": EXAMPLES[:1], "test": EXAMPLES[1:]})
    mine = tmp_path / "mine.jinja"
    hashes = []
    for text in ("Q: {{ instruction }} {{ input }}\nA:", "Question: {{ instruction }} {{ input }}\nA:"):
        mine.write_text(text, encoding="utf-8")
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(compose(["+experiment=smoke", "prompt=plain",
                                                  f"prompt.template_file={mine}"])))
        out, report = tmp_path / "rendered", tmp_path / "report.json"
        assert render.main(["--params", str(params), "--prepared", str(prepared), "--base-model", str(smoke_base),
                            "--out", str(out), "--report", str(report), "--plot", str(tmp_path / "len.png")]) == 0
        first = read_jsonl(out / "train.jsonl")[0]
        assert first["prompt"] == text.split("{{")[0] + "Classify the sentiment of the review. The food was great.\nA:"
        saved = read_json(out / "template.json")
        assert saved["template"] == text
        hashes.append(saved["hash"])
    assert hashes[0] != hashes[1]
    assert (tmp_path / "len.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_template_file_is_a_clean_error(tmp_path: Path, smoke_base: Path, capsys) -> None:
    import yaml

    from pipeline.core.cli import guard
    from pipeline.params import compose

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(compose(["prompt=plain", f"prompt.template_file={tmp_path / 'nope.jinja'}"])))
    argv = ["--params", str(params), "--prepared", str(tmp_path), "--base-model", str(smoke_base),
            "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json")]
    code = guard("render", lambda: render.main(argv))  # what `python -m pipeline.render` runs
    assert code == 1 and "prompt.template_file: cannot read" in capsys.readouterr().err


def test_k_shot_exemplars_come_from_train_only_and_follow_the_seed(tmp_path: Path, smoke_base: Path,
                                                                   smoke_cfg) -> None:
    train = [example(i, f"label{i}", f"train review {i}") for i in range(10)]
    test = [example(100 + i, f"secret{i}", f"test review {i}") for i in range(4)]
    prepared = write_prepared(tmp_path, {"train": train, "val": test[:2], "test": test})

    def rendered(seed: int, option: str = "chat") -> list[dict]:
        cfg = dataclasses.replace(smoke_cfg.prompt, k_shot=3, shot_seed=seed, max_length=1024)
        if option == "plain":
            cfg = dataclasses.replace(cfg, kind="jinja", template="{{ instruction }}\n{{ input }}\nAnswer: ")
        out = tmp_path / f"r{seed}{option}"
        render.run(dataclasses.replace(smoke_cfg, prompt=cfg), render.Paths(prepared, smoke_base, out, tmp_path / "report.json"))
        return read_jsonl(out / "test.jsonl")

    rows = rendered(0)
    for row in rows:
        shown = [f"label{i}" for i in range(10) if f"label{i}<|im_end|>" in row["prompt"]]
        assert len(shown) == 3  # three exemplars, each answered, all from train
        assert "secret" not in row["prompt"]  # never a val/test answer
        assert row["prompt"].count("<|im_start|>user") == 4
        assert [t for t in row["labels"] if t != IGNORE_INDEX]  # only the real answer is learnt
    assert [r["prompt"] for r in rendered(0)] == [r["prompt"] for r in rows]
    assert [r["prompt"] for r in rendered(1)] != [r["prompt"] for r in rows]
    plain = rendered(0, "plain")[0]["prompt"]
    assert plain.count("Answer: ") == 4 and "secret" not in plain
    train_rows = read_jsonl(tmp_path / "r0chat" / "train.jsonl")
    assert all(f"label{r['id'][3:]}<|im_end|>" not in r["prompt"] for r in train_rows)  # never its own answer

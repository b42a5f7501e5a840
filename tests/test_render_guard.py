"""Render's guard: an example with no loss-bearing token stops the stage and names the example;
the report's loss-token fraction is per split."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import render
from pipeline.core.files import write_jsonl
from pipeline.core.models import load_tokenizer
from pipeline.prompting.templates import Template
from pipeline.prompting.rows import tokenize_split

# No end-of-sequence token appended: an empty output then renders to an empty completion.
BARE = Template(name="bare", kind="jinja", system=None, template="{{ instruction }}\nAnswer:", chat_template=None,
                bos_token="", eos_token="")


def example(i: int, output: str) -> dict:
    return {"id": f"ex-{i}", "task": "t", "task_type": "free_text", "instruction": "Say something.",
            "input": "", "output": output}


def test_an_example_without_completion_tokens_fails_naming_it(smoke_base: Path) -> None:
    tokenizer = load_tokenizer(smoke_base)
    rows, report = tokenize_split([example(0, "fine")], BARE, tokenizer, max_length=64, overflow="truncate")
    assert report["loss_token_fraction"] == pytest.approx(
        len(tokenizer("fine", add_special_tokens=False)["input_ids"]) / len(rows[0]["input_ids"]))
    with pytest.raises(ValueError, match=r"example 'ex-1' has no completion tokens"):
        tokenize_split([example(0, "fine"), example(1, "")], BARE, tokenizer, max_length=64,
                              overflow="truncate")


def test_report_has_a_loss_token_fraction_per_split(tmp_path: Path, smoke_base: Path, smoke_cfg) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    outputs = {"train": ["a b c d e f", "g h"], "val": ["short"], "test": ["one two three"]}
    for split, outs in outputs.items():
        write_jsonl(prepared / f"{split}.jsonl", [example(i, o) for i, o in enumerate(outs)])
    report = render.run(smoke_cfg, render.Paths(prepared, smoke_base, tmp_path / "rendered", tmp_path / "report.json"))
    fractions = {s: r["loss_token_fraction"] for s, r in report["splits"].items()}
    assert set(fractions) == {"train", "val", "test"}
    assert all(0 < f < 1 for f in fractions.values())
    assert len(set(fractions.values())) == 3  # computed per split, not once for all

"""Real data, end to end with the smoke model: prepare each self-instruct T0 file (one task per file),
render them together, and evaluate the zero-shot baseline on every task type.

Skipped when ../shared (the real data) is absent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import SHARED
from pipeline import evaluate, prepare, render
from pipeline.core.config import from_mapping
from pipeline.core.files import read_json, read_jsonl, write_jsonl
from pipeline.params import compose

T0 = SHARED / "data" / "self-instruct" / "t0"
TASK_TYPES = {  # file-name prefix -> task type the issue assigns it
    "amazon_polarity": "classification",
    "ag_news": "classification",
    "adversarial_qa": "short_answer",
    "gigaword_TLDR": "free_text",
}

pytestmark = pytest.mark.skipif(not T0.is_dir(), reason=f"real data not found at {T0}")


def files() -> dict[Path, str]:
    found = {f: tt for f in sorted(T0.glob("*.jsonl")) for prefix, tt in TASK_TYPES.items() if f.stem.startswith(prefix)}
    assert {tt for tt in found.values()} == set(TASK_TYPES.values()), f"expected files missing in {T0}"
    return found


def test_prepare_render_evaluate_on_self_instruct_t0(tmp_path: Path, smoke_base: Path) -> None:
    merged = {split: [] for split in prepare.SPLITS}
    for path, task_type in files().items():
        cfg = from_mapping(compose(["+experiment=smoke", "data=local", f"data.path={path}",
                                    "data.format=prompt_completion", f"data.task_type={task_type}"]))
        stats = prepare.run(cfg, prepare.Paths(tmp_path / path.stem, tmp_path / f"{path.stem}.json"))
        assert stats["task_types"] == {path.stem: task_type}
        for split in prepare.SPLITS:
            merged[split] += read_jsonl(tmp_path / path.stem / f"{split}.jsonl")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, rows in merged.items():
        write_jsonl(prepared / f"{split}.jsonl", rows)
    assert not any("<|endoftext|>" in r["output"] for rows in merged.values() for r in rows)

    report = render.run(cfg, render.Paths(prepared, smoke_base, tmp_path / "rendered", tmp_path / "render.json"))
    assert all(0 < s["loss_token_fraction"] < 1 for s in report["splits"].values())

    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, models=["base"], max_examples=3))
    metrics = evaluate.run(cfg, evaluate.Paths(tmp_path / "rendered", prepared, smoke_base, tmp_path / "eval"), None)

    by_type = {path.stem: tt for path, tt in files().items()}
    assert set(metrics["base"]) == {*by_type, "overall"}
    expected_keys = {"classification": {"accuracy", "macro_f1", "macro_precision", "macro_recall", "unmatched_rate"},
                     "short_answer": {"exact_match", "token_f1"},
                     "free_text": {"rouge1", "rouge2", "rougeL", "bleu", "chrf"}}
    intervals = read_json(tmp_path / "eval" / "intervals.json")
    for task, task_type in by_type.items():
        assert expected_keys[task_type] | {"perplexity"} <= set(metrics["base"][task]), task
        assert set(intervals["intervals"]["base"][task]) == set(metrics["base"][task]), task
        assert metrics["base"][task]["perplexity"] > 1
    labels = evaluate.label_sets(prepared)
    for path, task_type in files().items():
        if task_type == "classification":  # the label set is every answer the file gives, end marker cut
            completions = {r["completion"].removesuffix("<|endoftext|>") for r in read_jsonl(path)}
            assert labels[path.stem] == sorted(completions)
    ag_news = next(t for t in by_type if t.startswith("ag_news"))
    assert intervals["confusion"]["base"][ag_news]["labels"] == [*labels[ag_news], "<unmatched>"]
    rows = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert len(rows) == 3 * len(by_type)
    assert all(r["reference"] and "base_scores" in r for r in rows)
    assert (tmp_path / "eval" / "confusion" / f"{ag_news}_base.json").is_file()

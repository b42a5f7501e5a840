"""Stage 3, render: prompt template -> tokenized training rows with exact label masks.

Reads ``prompt`` from params.yaml, the prepared splits and the base tokenizer. Writes
per split ``<split>.jsonl`` rows ``{id, task, task_type, prompt, completion, input_ids,
labels}`` where ``labels`` is ``-100`` on every prompt token, plus ``template.json``
(the template and its hash) to ``--out``, and a report of lengths, truncations, drops
and the fraction of loss-bearing tokens to ``--report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline import config
from pipeline.files import atomic_dir, read_jsonl, write_json, write_jsonl
from pipeline.models import IGNORE_INDEX, load_tokenizer
from pipeline.prompts import Template, make_template, render

SPLITS = ("train", "val", "test")


def tokenize_split(examples: list[dict[str, Any]], template: Template, tokenizer: Any,
                   max_length: int, overflow: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render, tokenize (batched, fast tokenizer) and mask one split.

    Prompt and completion are tokenized separately and concatenated, so the label mask
    is exact and generation at evaluation time starts from exactly these prompt ids.
    Over-long rows keep the completion whole and lose prompt tokens from the start
    (``truncate``) or are removed (``drop``); both are counted.
    """
    pairs = [render(ex, template) for ex in examples]
    prompt_ids = tokenizer([p for p, _ in pairs])["input_ids"] if pairs else []
    completion_ids = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    rows, truncated, dropped = [], [], []
    for ex, (prompt, completion), p_ids, c_ids in zip(examples, pairs, prompt_ids, completion_ids):
        overflow_by = len(p_ids) + len(c_ids) - max_length
        if overflow_by > 0:
            if overflow == "drop" or len(c_ids) >= max_length:
                dropped.append({"id": ex["id"], "reason": f"longer than max_length={max_length}"})
                continue
            p_ids = p_ids[overflow_by:]
            truncated.append(ex["id"])
        if not c_ids:
            raise ValueError(f"render: example {ex['id']!r} has no completion tokens (empty output?)")
        rows.append({
            "id": ex["id"], "task": ex["task"], "task_type": ex["task_type"],
            "prompt": prompt, "completion": completion,
            "input_ids": p_ids + c_ids,
            "labels": [IGNORE_INDEX] * len(p_ids) + c_ids,
        })
    total = sum(len(r["input_ids"]) for r in rows)
    loss_tokens = sum(sum(1 for t in r["labels"] if t != IGNORE_INDEX) for r in rows)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    report = {
        "rows": len(rows),
        "tokens": total,
        "loss_token_fraction": loss_tokens / total if total else 0.0,
        "max_length_seen": lengths[-1] if lengths else 0,
        "median_length": lengths[len(lengths) // 2] if lengths else 0,
        "truncated": len(truncated),
        "dropped": len(dropped),
    }
    return rows, {**report, "dropped_rows": dropped}


def run(prompt_cfg: config.PromptConfig, prepared: Path, base_model: Path, out: Path, report_path: Path) -> dict[str, Any]:
    """Render every split of ``prepared`` into ``out`` atomically; write the report."""
    tokenizer = load_tokenizer(base_model)
    template = make_template(prompt_cfg, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    report: dict[str, Any] = {"template": template.name, "template_hash": template.hash(), "splits": {}}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows, split_report = tokenize_split(read_jsonl(prepared / f"{split}.jsonl"), template, tokenizer,
                                                prompt_cfg.max_length, prompt_cfg.overflow)
            write_jsonl(tmp / f"{split}.jsonl", rows)
            report["splits"][split] = split_report
        write_json(tmp / "template.json", template.to_dict())
    write_json(report_path, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, required=True, help="prepare stage output directory")
    parser.add_argument("--base-model", type=Path, required=True, help="base_model stage output (tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="directory for rendered <split>.jsonl")
    parser.add_argument("--report", type=Path, required=True, help="render report JSON to write")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    report = run(cfg.prompt, args.prepared, args.base_model, args.out, args.report)
    for split, r in report["splits"].items():
        print(f"render: {split}: {r['rows']} rows, {r['tokens']} tokens, "
              f"{r['loss_token_fraction']:.1%} loss-bearing, {r['truncated']} truncated, {r['dropped']} dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

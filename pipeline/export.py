"""Stage 6, export: the fine-tuned model as one standalone Hugging Face checkpoint.

Reads ``export``. Writes to ``--out`` the LoRA adapter merged into the base weights by peft's
``merge_and_unload`` (full fine-tuning: the tuned weights as they are) as safetensors, with the
tokenizer, the chat template the model was trained with, the generation config,
``template.json`` and ``source.json`` (the digest of the trained folder it came from, which is
how ``python -m pipeline.promote`` ties it to its training run). Before it keeps the folder it
loads it back and checks that its logits equal the unmerged model's on the first
``export.check_rows`` rendered test rows within ``export.atol`` (fp32); the largest difference
goes to ``--check``. Nothing is logged to MLflow here: a merged copy is as large as the base
model, so only ``promote`` logs it, once, into the Model Registry. ``export.enabled: false``
writes ``skipped.json`` only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import cli, config
from pipeline.core.errors import ModelError
from pipeline.core.files import atomic_dir, read_json, read_jsonl, write_json
from pipeline.tracking.stage_run import model_digest

SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class Paths:
    rendered: Path = cli.field("render stage output (test prompts for the logits check)")
    base_model: Path = cli.field("base_model stage output")
    tuned: Path = cli.field("train stage output (adapter or full weights)")
    out: Path = cli.field("directory for the merged checkpoint")
    check: Path = cli.field("JSON report of the merged-vs-unmerged logits check")


def run(cfg: config.PipelineConfig, paths: Paths) -> dict[str, Any]:
    """Merge, save, reload and check; write the checkpoint to ``paths.out`` atomically; return the check."""
    from pipeline.core.models import load_causal_lm, load_tokenizer
    from pipeline.training import merge

    if not cfg.export.enabled:
        return _skip(paths, "export.enabled is false")
    start = time.perf_counter()
    template = read_json(paths.tuned / "template.json")
    prompts = [r["input_ids"] for r in read_jsonl(paths.rendered / "test.jsonl")[:cfg.export.check_rows]]
    model, method = merge.load_tuned(paths.base_model, paths.tuned)
    before = merge.logits(model, prompts)  # the unmerged adapter's (or the tuned weights') logits
    tokenizer = load_tokenizer(paths.base_model)
    if template.get("kind") == "chat" and template.get("chat_template"):
        tokenizer.chat_template = template["chat_template"]  # what the model was trained on, for serving
    with atomic_dir(paths.out) as tmp:
        merge.save(merge.merge(model, method), tokenizer, tmp, cfg.model.path)
        write_json(tmp / "template.json", template)
        write_json(tmp / SOURCE_FILE, {"tuned_digest": model_digest(paths.tuned), "method": method})
        diff = merge.max_logit_diff(before, merge.logits(load_causal_lm(tmp), prompts))
        check = {"method": method, "rows": len(prompts), "dtype": "float32", "atol": cfg.export.atol,
                 "max_abs_diff": diff, "passed": diff <= cfg.export.atol}
        if not check["passed"]:
            raise ModelError(f"export: the merged model's logits differ from the unmerged model's by {diff:.3g} "
                             f"(export.atol {cfg.export.atol:g}) on {len(prompts)} test rows; nothing was written")
    write_json(paths.check, check)
    print(f"export: {method} -> {paths.out}; logits max |diff| {diff:.3g} on {len(prompts)} rows "
          f"(atol {cfg.export.atol:g}) in {time.perf_counter() - start:.1f}s", flush=True)
    return check


def _skip(paths: Paths, reason: str) -> dict[str, Any]:
    with atomic_dir(paths.out) as tmp:
        write_json(tmp / "skipped.json", {"skipped": reason})
    write_json(paths.check, {"skipped": reason})
    print(f"export: skipped: {reason}", flush=True)
    return {"skipped": reason}


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    run(config.load(params), paths)
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("export", main))

"""Stage 3, render: prompt template -> tokenized training rows with exact label masks.

Reads ``prompt``, the prepared splits and the base tokenizer. Writes
per split ``<split>.jsonl`` rows ``{id, task, task_type, prompt, completion, input_ids,
labels}`` where ``labels`` is ``-100`` on every token that is not an assistant answer,
plus ``template.json`` (the template and its hash) to ``--out``, a report of lengths,
truncations, drops and the fraction of loss-bearing tokens to ``--report``, and a
token-length histogram to ``--plot``. A ``prompt.template_file`` is read here, by
:func:`run`, under both runners. DVC re-runs this stage only when the prepared data, the
tokenizer, this code or the ``prompt`` params change: that is the render cache.

Rows are rendered in chunks by one forked process per CPU (:func:`render_jobs`); the
files are the same bytes as one process writes. The tokenizer is loaded with
``tokenizers`` alone when its files are what the base_model stage recorded
(:func:`pipeline.core.models.load_fast_tokenizer`): importing transformers would cost more
than rendering a small dataset.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import cli, config, parallel
from pipeline.core.files import atomic_dir, read_json, read_jsonl, write_json
from pipeline.core.models import load_fast_tokenizer
from pipeline.prompting.rows import Job, render_jobs, tokenize_split
from pipeline.prompting.shots import ShotPool
from pipeline.prompting.templates import Template, make_template, read_template_file

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Paths:
    prepared: Path = cli.field("prepare stage output directory")
    base_model: Path = cli.field("base_model stage output (tokenizer)")
    out: Path = cli.field("directory for rendered <split>.jsonl")
    report: Path = cli.field("render report JSON to write")
    plot: Path | None = cli.field("PNG histogram of token lengths per split", default=None)


def run(cfg: config.PipelineConfig, paths: Paths) -> dict[str, Any]:
    """Render every split of ``paths.prepared`` into ``paths.out`` atomically; write the report and the plot.

    ``prompt.template_file``, when set, is read here: its text is the template.
    """
    return render(read_template_file(cfg.prompt), paths)


@parallel.paused_gc()  # row work: no reference cycles to collect (see paused_gc)
def render(prompt_cfg: config.PromptConfig, paths: Paths) -> dict[str, Any]:
    """The causal LM's rows: every split through the template and the tokenizer.

    The test split's labels are its last answer only, whatever ``train_on`` says: that
    is the answer evaluation generates and scores. k-shot exemplars come from train.
    """
    tokenizer = load_fast_tokenizer(paths.base_model)
    template = make_template(prompt_cfg, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    splits = {split: read_jsonl(paths.prepared / f"{split}.jsonl") for split in SPLITS}
    pool = ShotPool(splits["train"]) if template.k_shot or prompt_cfg.eval_k_shot else None
    if prompt_cfg.max_length == "auto":
        prompt_cfg = dataclasses.replace(prompt_cfg, max_length=auto_max_length(
            splits["train"], template, tokenizer, pool, model_context(paths.base_model)))
    jobs = [Job(split, examples, template, prompt_cfg.max_length, split == "test")
            for split, examples in splits.items()]
    kshot = dataclasses.replace(template, k_shot=prompt_cfg.eval_k_shot)
    if prompt_cfg.eval_k_shot:
        jobs.append(kshot_job(splits["test"], kshot, prompt_cfg))
    with atomic_dir(paths.out) as tmp:
        done = render_jobs(jobs, tokenizer, (prompt_cfg.overflow, prompt_cfg.truncate_side), pool, tmp)
        write_json(tmp / "template.json", template.to_dict())
        if prompt_cfg.eval_k_shot:
            write_json(tmp / "template_kshot.json", kshot.to_dict())
    report = {"template": template.name, "template_hash": template.hash(), "max_length": prompt_cfg.max_length,
              "splits": {split: done[split][0] for split in SPLITS}}
    if prompt_cfg.eval_k_shot:
        report["kshot_arm"] = done[KSHOT][0]
    report["warnings"] = truncation_warnings({**report["splits"], **({KSHOT: done[KSHOT][0]} if prompt_cfg.eval_k_shot
                                                                      else {})}, prompt_cfg.truncate_side)
    for line in report["warnings"]:
        print(f"render: warning: {line}", flush=True)
    return _finish(report, paths.report, {split: done[split][1] for split in SPLITS}, paths.plot,
                   prompt_cfg.max_length)


TRUNCATED_WARN = 0.05  # a task with more of its rows truncated than this gets a warning


def truncation_warnings(reports: dict[str, dict[str, Any]], side: str = "end") -> list[str]:
    """One line per split and task whose share of truncated rows is over :data:`TRUNCATED_WARN`."""
    hint = "raise prompt.max_length (or auto)" + (", or set prompt.truncate_side=middle" if side == "end" else "")
    out = []
    for split, r in reports.items():
        for task, c in r.get("truncated_by_task", {}).items():
            if c["rows"] and c["truncated"] / c["rows"] > TRUNCATED_WARN:
                out.append(f"{split}: task {task}: {c['truncated']}/{c['rows']} rows "
                           f"({c['truncated'] / c['rows']:.0%}) truncated; {hint}")
    return out


def model_context(base_model: Path) -> int | None:
    """The base model's context length (``max_position_embeddings`` of its ``config.json``), if it says."""
    path = base_model / "config.json"
    return read_json(path).get("max_position_embeddings") if path.exists() else None


def auto_max_length(train: list[dict[str, Any]], template: Template, tokenizer: Any, pool: ShotPool | None,
                    context: int | None) -> int:
    """``prompt.max_length: auto``: the 99th percentile (nearest rank) of the train split's rendered
    token lengths, at most the model's ``context``, at least 8."""
    cap = context or 1 << 30
    rows, _ = tokenize_split(train, template, tokenizer, cap, "truncate", pool=pool if template.k_shot else None)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    if not lengths:
        return min(cap, 256)
    return max(8, min(cap, lengths[max(0, math.ceil(0.99 * len(lengths)) - 1)]))


def _finish(report: dict[str, Any], report_path: Path, lengths: dict[str, list[int]], plot_path: Path | None,
            limit: int) -> dict[str, Any]:
    """Write the report and, when asked, the token-length histogram per split."""
    write_json(report_path, report)
    if plot_path is not None:
        from pipeline.core.plots import length_histograms

        length_histograms(lengths, "tokens per example", plot_path, limit=limit)
    return report


KSHOT = "test_kshot"  # the k-shot arm's file: test_kshot.jsonl, with its own template_kshot.json


def kshot_job(test: list[dict[str, Any]], kshot: Template, prompt_cfg: config.PromptConfig) -> Job:
    """The test split with ``eval_k_shot`` train exemplars before each prompt: the base model's k-shot arm.

    ``template.json`` stays the training template, so evaluate's template guard still
    checks the tuned model. The length limit is ``max_length`` per shown example (k
    exemplars + the question): cutting exemplars to the training limit would truncate the
    very context this arm is about.
    """
    return Job(KSHOT, test, kshot, prompt_cfg.max_length * (prompt_cfg.eval_k_shot + 1), True)


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    report = run(config.load(params), paths)
    for split, r in report["splits"].items():
        print(f"render: {split}: {r['rows']} rows, {r['tokens']} tokens, {r['loss_token_fraction']:.1%} "
              f"loss-bearing, {r['truncated']} truncated, {r['dropped']} dropped")
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("render", main))

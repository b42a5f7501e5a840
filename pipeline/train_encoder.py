"""Stage train_encoder: the encoder arm beside the causal LM (one config, the same test split).

Reads ``encoder`` and ``seed`` (and ``tracking``) and the prepared splits
the causal LM trains on. Materializes ``encoder.model`` (any Hugging Face encoder, as
``model.path``), gives it a label head over the train split's classification labels,
fine-tunes every weight with the shared Lightning module on those tasks' train rows
(validating on val), and writes to ``--out`` the classifier (``model/``, safetensors, with
its tokenizer), ``labels.json``, ``template.json`` (the text settings evaluate tokenizes the
test rows with) and ``summary.json``; loss curves go to ``--curves``; one MLflow run (tag
``arm=encoder``) when run by DVC (the Hydra app builds the arm once for many jobs and logs
its scores into each job's run instead). When ``encoder.enabled`` is false or the data has no
classification task, ``--out`` holds only ``skipped.json`` with the reason, and evaluate
skips the arm.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import cli, config
from pipeline.core.files import atomic_dir, hash_files, read_jsonl, write_json, write_jsonl
from pipeline.tracking import stage_run
from pipeline.tracking.runs import Tracking
from pipeline.training import encoder, fit

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Paths:
    prepared: Path = cli.field("prepare stage output (the shared splits)")
    out: Path = cli.field("directory for the classifier (or the skip marker)")
    curves: Path = cli.field("directory for loss curves")


def skip(out: Path, curves: Path, reason: str) -> dict[str, Any]:
    """The marker that keeps DVC's outputs whole when there is no encoder arm to train."""
    with atomic_dir(out) as tmp:
        write_json(tmp / encoder.SKIPPED_FILE, {"reason": reason})
    curves.mkdir(parents=True, exist_ok=True)
    print(f"train_encoder: skipped: {reason}", flush=True)
    return {"skipped": reason}


def run(cfg: config.PipelineConfig, paths: Paths, tracking: Tracking | None) -> dict[str, Any]:
    """Train the encoder arm (or write the skip marker); return the summary written to ``summary.json``
    (and the MLflow ``run_id``, given ``tracking``)."""
    enc = cfg.encoder
    splits = {s: read_jsonl(paths.prepared / f"{s}.jsonl") for s in SPLITS}
    if not enc.enabled:
        return skip(paths.out, paths.curves, "encoder.enabled is false (encoder=none)")
    labels = encoder.label_map(splits)
    if not labels["labels"]:
        return skip(paths.out, paths.curves, "the prepared train split has no classification task")

    import lightning as L
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    fit.quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the one place this stage seeds global RNGs
    template = encoder.template_info(enc.include_instruction, enc.max_length, labels)
    params = _own_params(config.to_dict(cfg))
    fitting = [False]
    stage_run.sigterm_outside(lambda: fitting[0])
    client = mlf.locked_write(tracking.uri, lambda: MlflowClient(tracking.uri)) if tracking else None
    run_id = _open_run(cfg, params, paths.prepared, template, tracking) if tracking else None

    def terminate(status: str) -> None:
        if run_id is not None:
            mlf.locked_write(tracking.uri, lambda: client.set_terminated(run_id, status))  # type: ignore[union-attr]

    with stage_run.closing(terminate):  # opened before anything that can fail
        model, tokenizer, summary = _fit(cfg, paths, labels, tracking, run_id, fitting)
        fit.save(paths.out, model, "model", params,
                 {encoder.LABELS_FILE: labels, "template.json": template, "summary.json": summary}, tokenizer=tokenizer)
        _log(client, tracking.uri if tracking else None, run_id, paths)
    print(f"train_encoder: {summary['steps']} steps, final train loss {summary['train_loss']}, "
          f"val loss {summary['val_loss']}; MLflow run {run_id}", flush=True)
    return {**summary, "run_id": run_id}


def _fit(cfg: config.PipelineConfig, paths: Paths, labels: dict[str, Any], tracking: Tracking | None,
         run_id: str | None, fitting: list[bool]) -> tuple[Any, Any, dict[str, Any]]:
    """Materialize the encoder, render the rows for it, give it a label head and fit every weight."""
    from pipeline.core.models import load_tokenizer, materialize
    from pipeline.training.module import LossCurve, RenderedData

    enc, t = cfg.encoder, cfg.encoder.trainer
    splits = {s: read_jsonl(paths.prepared / f"{s}.jsonl") for s in ("train", "val")}
    with tempfile.TemporaryDirectory(prefix="train_encoder-") as work:
        base, rendered = Path(work) / "base", Path(work) / "rendered"
        materialize(enc.model, base, cfg.seed)  # not an output: the pretrained encoder is a package or hub id
        tokenizer = load_tokenizer(base)
        report = {}
        for split, rows in splits.items():
            out_rows, report[split] = encoder.render_rows(rows, labels, tokenizer, enc.include_instruction,
                                                          enc.max_length)
            write_jsonl(rendered / f"{split}.jsonl", out_rows)
        model = encoder.load_classifier(base, labels["labels"])
        n_trainable, _ = fit.trainable(model)
        print(f"train_encoder: {enc.model.name}, {n_trainable:,} trainable parameters, {report['train']['rows']} "
              f"train rows of {', '.join(labels['tasks'])}; other tasks left out: "
              f"{report['train']['skipped'] or 'none'}", flush=True)
        curve = LossCurve(paths.curves)
        # No checkpoints: a short run that restarts from scratch (train's resume machinery is for the LLM).
        trainer = fit.build_trainer(t, curve, Path(work), cfg.tracking.experiment,
                                    tracking.uri if tracking else None, run_id, enable_checkpointing=False)
        data = RenderedData(rendered, t.batch_size, tokenizer.pad_token_id, cfg.seed, t.num_workers,
                            encoder.collate, t.batching, t.pack_length)
        start = time.perf_counter()
        fitting[0] = True
        fit.fit_tuner(trainer, model, t, encoder.loss, data)
        fitting[0] = False
    print(f"train_encoder: fit in {time.perf_counter() - start:.0f}s", flush=True)
    curve.write()
    return model, tokenizer, fit.summary(trainer, curve, model=enc.model.name, trainable_parameters=n_trainable,
                                         train_rows=report["train"]["rows"], tasks=list(labels["tasks"]))


def _own_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params sections that decide the encoder arm (dvc.yaml lists these, and tracking): saved and logged."""
    return {k: params.get(k) for k in ("encoder", "seed")}


def _open_run(cfg: config.PipelineConfig, params: dict[str, Any], prepared: Path, template: dict[str, Any],
              tracking: Tracking) -> str:
    from pipeline.tracking import runs as mlf

    tags = {**mlf.run_tags(tracking.repo_root, hash_files([prepared / "train.jsonl", prepared / "val.jsonl"]),
                           template["hash"], tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id),
            "arm": "encoder"}
    return mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, mlf.redact_tree(params), tags,
                         run_name=f"encoder-{cfg.encoder.model.name}")


def _log(client: Any, uri: str | None, run_id: str | None, paths: Paths) -> None:
    """The loss plot; with a run, the saved files as its artifacts and the folder's digest as its tag."""
    from pipeline.core.plots import loss_curve

    loss_curve(paths.curves / "train_loss.csv", paths.curves / "val_loss.csv", paths.curves / "loss.png")
    if run_id is None or uri is None:
        return
    fit.log_outputs(client, uri, run_id, paths.out, "model", paths.curves,
                    ("config.yaml", "template.json", encoder.LABELS_FILE, "summary.json"))


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    run(config.load(params), paths, Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("train_encoder", main))

"""Stage train_encoder: the encoder arm beside the causal LM (one config, the same test split).

Reads ``encoder`` and ``seed`` (and ``tracking``) from params.yaml and the prepared splits
the causal LM trains on. Materializes ``encoder.model`` (any Hugging Face encoder, as
``model.path``), gives it a label head over the train split's classification labels,
fine-tunes every weight with the shared Lightning module on those tasks' train rows
(validating on val), and writes to ``--out`` the classifier (``model/``, safetensors, with
its tokenizer), ``labels.json``, ``template.json`` (the text settings evaluate tokenizes the
test rows with), ``summary.json`` and ``run.json``; loss curves go to ``--curves``; one
MLflow run (tag ``arm=encoder``). When ``encoder.enabled`` is false or the data has no
classification task, ``--out`` holds only ``skipped.json`` with the reason, and evaluate
skips the arm.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.core import config
from pipeline.training import encoder
from pipeline.core.files import atomic_dir, hash_files, read_jsonl, write_json, write_jsonl
from pipeline.tracking.runs import Tracking

SPLITS = ("train", "val", "test")


def skip(out: Path, curves: Path, reason: str) -> dict[str, Any]:
    """The marker that keeps DVC's outputs whole when there is no encoder arm to train."""
    with atomic_dir(out) as tmp:
        write_json(tmp / encoder.SKIPPED_FILE, {"reason": reason})
    curves.mkdir(parents=True, exist_ok=True)
    print(f"train_encoder: skipped: {reason}", flush=True)
    return {"skipped": reason}


def run(cfg: config.PipelineConfig, params: dict[str, Any], prepared: Path, out: Path, curves: Path,
        tracking: Tracking | None) -> dict[str, Any]:
    """Train the encoder arm (or write the skip marker); return the summary written to ``summary.json``."""
    enc = cfg.encoder
    splits = {s: read_jsonl(prepared / f"{s}.jsonl") for s in SPLITS}
    if not enc.enabled:
        return skip(out, curves, "encoder.enabled is false (encoder=none)")
    labels = encoder.label_map(splits)
    if not labels["labels"]:
        return skip(out, curves, f"{prepared / 'train.jsonl'} has no classification task")

    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.core.models import load_tokenizer, materialize
    from pipeline.core.plots import loss_curve
    from pipeline.training.module import InstructionTuner, LossCurve, RenderedData, trainer_settings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the one place this stage seeds global RNGs
    template = encoder.template_info(enc.include_instruction, enc.max_length, labels)
    t = enc.trainer
    run_id = None
    with tempfile.TemporaryDirectory(prefix="train_encoder-") as work:
        base, rendered = Path(work) / "base", Path(work) / "rendered"
        materialize(enc.model, base, cfg.seed)  # not an output: the pretrained encoder is a package or hub id
        tokenizer = load_tokenizer(base)
        report = {}
        for split in ("train", "val"):
            rows, report[split] = encoder.render_rows(splits[split], labels, tokenizer, enc.include_instruction,
                                                      enc.max_length)
            write_jsonl(rendered / f"{split}.jsonl", rows)
        model = encoder.load_classifier(base, labels["labels"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"train_encoder: {enc.model.name}, {trainable:,} trainable parameters, {report['train']['rows']} "
              f"train rows of {', '.join(labels['tasks'])}; other tasks left out: "
              f"{report['train']['skipped'] or 'none'}", flush=True)
        if tracking is not None:
            run_id = _open_run(cfg, params, prepared, template, tracking)
        curve = LossCurve(curves)
        trainer = L.Trainer(
            **trainer_settings(t),
            logger=MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=tracking.uri, run_id=run_id)
            if tracking is not None else False,
            # No checkpoints: a short run that restarts from scratch (train's resume machinery is for the LLM).
            callbacks=[curve, TQDMProgressBar(refresh_rate=1)], enable_checkpointing=False,
            default_root_dir=work,
        )
        data = RenderedData(rendered, t.batch_size, tokenizer.pad_token_id, cfg.seed, t.num_workers,
                            encoder.collate, t.batching, t.pack_length)
        start = time.perf_counter()
        try:
            trainer.fit(InstructionTuner(model, t, encoder.loss), datamodule=data)
        except BaseException:
            _close(tracking, run_id, "FAILED")
            raise
    seconds = time.perf_counter() - start
    curve.write()
    summary = {"model": enc.model.name, "trainable_parameters": trainable, "steps": trainer.global_step,
               "seconds": round(seconds, 1), "train_rows": report["train"]["rows"], "tasks": list(labels["tasks"]),
               "train_loss": curve.train[-1][1] if curve.train else None,
               "val_loss": curve.val[-1][1] if curve.val else None}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        write_json(tmp / encoder.LABELS_FILE, labels)
        write_json(tmp / "template.json", template)
        write_json(tmp / "summary.json", summary)
        (tmp / "config.yaml").write_text(yaml.safe_dump(_own_params(params), sort_keys=False))
        write_json(tmp / "run.json", {"run_id": run_id, "experiment": cfg.tracking.experiment})
    loss_curve(curves / "train_loss.csv", curves / "val_loss.csv", curves / "loss.png")
    if tracking is not None:
        _log_artifacts(tracking, run_id, out, curves)  # type: ignore[arg-type]
    print(f"train_encoder: {summary['steps']} steps in {seconds:.0f}s, final train loss {summary['train_loss']}, "
          f"val loss {summary['val_loss']}; MLflow run {run_id}", flush=True)
    return summary


def _own_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params sections that decide the encoder arm (dvc.yaml lists these, and tracking): saved and logged."""
    return {k: params.get(k) for k in ("encoder", "seed")}


def _open_run(cfg: config.PipelineConfig, params: dict[str, Any], prepared: Path, template: dict[str, Any],
              tracking: Tracking) -> str:
    from pipeline.tracking import runs as mlf

    tags = {**mlf.run_tags(tracking.repo_root, hash_files([prepared / "train.jsonl", prepared / "val.jsonl"]),
                           template["hash"], tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id),
            "arm": "encoder"}
    logged = mlf.redact_tree(_own_params(params))
    return mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, logged, tags,
                         run_name=f"encoder-{cfg.encoder.model.name}")


def _close(tracking: Tracking | None, run_id: str | None, status: str) -> None:
    if tracking is not None and run_id is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking.uri).set_terminated(run_id, status)


def _log_artifacts(tracking: Tracking, run_id: str, out: Path, curves: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.uri)
    for name in ("config.yaml", "template.json", encoder.LABELS_FILE, "summary.json"):
        client.log_artifact(run_id, str(out / name))
    client.log_artifacts(run_id, str(out / "model"), artifact_path="model")
    client.log_artifacts(run_id, str(curves), artifact_path="plots")
    client.set_terminated(run_id, "FINISHED")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, required=True, help="prepare stage output (the shared splits)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the classifier (or the skip marker)")
    parser.add_argument("--curves", type=Path, required=True, help="directory for loss curves")
    args = parser.parse_args(argv)
    cfg, params = config.read(args.params)
    run(cfg, params, args.prepared, args.out, args.curves, Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("train_encoder", main))

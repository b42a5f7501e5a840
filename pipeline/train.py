"""Stage 4, train: fine-tune the base model on the rendered rows with Lightning.

Reads ``finetune``, ``trainer``, ``seed`` and ``tracking`` from params.yaml. Writes to
``--out`` the adapter (``adapter/``, LoRA) or full weights (``model/``), both as
safetensors, with the prompt template, the resolved config and the MLflow run id, so
evaluation renders prompts identically and logs into the same run. Loss curves go to
``--curves``; Lightning checkpoints to ``--checkpoints``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline import config
from pipeline.files import atomic_dir, hash_files, read_json, write_json


@dataclass(frozen=True)
class Tracking:
    """Where MLflow writes; resolved from the environment by the entry point only."""

    uri: str
    artifact_root: Path
    repo_root: Path
    dvc_exp_name: str | None = None
    parent_run_id: str | None = None  # set by a sweep: this run is nested under the sweep's run
    sweep_id: str | None = None
    run_name: str | None = None  # defaults to the DVC experiment name

    @classmethod
    def from_env(cls, root: Path) -> "Tracking":
        from pipeline.tracking import default_uri, store_root

        return cls(default_uri(root), store_root(root) / "mlartifacts", root, os.environ.get("DVC_EXP_NAME"))


def run(cfg: config.PipelineConfig, params: dict[str, Any], rendered: Path, base_model: Path, out: Path,
        curves: Path, checkpoints: Path, tracking: Tracking) -> dict[str, Any]:
    """Train, save the result to ``out`` atomically, log everything to one MLflow run."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from pipeline import tracking as mlf
    from pipeline.models import apply_finetune, load_causal_lm, load_tokenizer
    from pipeline.plots import loss_curve
    from pipeline.training import InstructionTuner, LossCurve, RenderedData

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the one place global RNGs are seeded
    template = read_json(rendered / "template.json")
    tokenizer = load_tokenizer(base_model)
    model = apply_finetune(load_causal_lm(base_model), cfg.finetune)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"train: {cfg.finetune.method}, {trainable:,} trainable of {total:,} parameters", flush=True)

    tags = mlf.run_tags(tracking.repo_root, hash_files([rendered / "train.jsonl", rendered / "val.jsonl"]),
                        template["hash"], tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id)
    run_id = mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, params, tags,
                           run_name=tracking.run_name or tracking.dvc_exp_name)
    client = MlflowClient(tracking.uri)
    try:
        t = cfg.trainer
        curve = LossCurve(curves)
        trainer = L.Trainer(
            accelerator=t.accelerator, devices=t.devices, precision=t.precision,  # type: ignore[arg-type]
            max_steps=t.max_steps, max_epochs=t.max_epochs,
            accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
            val_check_interval=t.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, deterministic=True,
            logger=MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=tracking.uri, run_id=run_id),
            # tqdm, not rich: it still draws when DVC pipes the output to a non-terminal.
            callbacks=[curve, TQDMProgressBar(refresh_rate=1), ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0,
                                              every_n_train_steps=t.val_check_interval)],
            enable_model_summary=False, default_root_dir=checkpoints,
        )
        data = RenderedData(rendered, t.batch_size, tokenizer.pad_token_id, cfg.seed, t.num_workers)
        start = time.perf_counter()
        trainer.fit(InstructionTuner(model, t), datamodule=data)
        seconds = time.perf_counter() - start

        summary = {
            "method": cfg.finetune.method, "trainable_parameters": trainable, "parameters": total,
            "steps": trainer.global_step, "seconds": round(seconds, 1),
            "train_loss": curve.train[-1][1] if curve.train else None,
            "val_loss": curve.val[-1][1] if curve.val else None,
        }
        with atomic_dir(out) as tmp:
            if cfg.finetune.method == "lora":
                model.save_pretrained(tmp / "adapter", safe_serialization=True)
            else:
                model.save_pretrained(tmp / "model", safe_serialization=True)
                tokenizer.save_pretrained(tmp / "model")
            write_json(tmp / "template.json", template)
            (tmp / "config.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            write_json(tmp / "run.json", {"run_id": run_id, "experiment": cfg.tracking.experiment})
            write_json(tmp / "summary.json", summary)
        loss_curve(curves / "train_loss.csv", curves / "val_loss.csv", curves / "loss.png")
        client.log_artifact(run_id, str(out / "config.yaml"))
        client.log_artifact(run_id, str(out / "template.json"))
        client.log_artifacts(run_id, str(out / ("adapter" if cfg.finetune.method == "lora" else "model")),
                             artifact_path="adapter" if cfg.finetune.method == "lora" else "model")
        client.log_artifacts(run_id, str(curves), artifact_path="plots")
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    print(f"train: {summary['steps']} steps in {seconds:.0f}s, final train loss {summary['train_loss']}, "
          f"val loss {summary['val_loss']}; MLflow run {run_id}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rendered", type=Path, required=True, help="render stage output directory")
    parser.add_argument("--base-model", type=Path, required=True, help="base_model stage output")
    parser.add_argument("--out", type=Path, required=True, help="directory for the adapter / weights")
    parser.add_argument("--curves", type=Path, required=True, help="directory for loss curves")
    parser.add_argument("--checkpoints", type=Path, required=True, help="directory for Lightning checkpoints")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    with open(args.params, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    shutil.rmtree(args.curves, ignore_errors=True)
    run(cfg, params, args.rendered, args.base_model, args.out, args.curves, args.checkpoints,
        Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

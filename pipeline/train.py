"""Stage 4, train: fine-tune the base model on the rendered rows with Lightning.

Reads ``finetune``, ``trainer``, ``seed`` and ``tracking`` from params.yaml. Writes to
``--out`` the adapter (``adapter/``, LoRA) or full weights (``model/``), both as
safetensors, with the prompt template, the resolved config and the MLflow run id, so
evaluation renders prompts identically and logs into the same run. Loss curves go to
``--curves``; Lightning checkpoints to ``--checkpoints``. An encoder base gets a label head
from the rendered ``labels.json`` and is saved as ``model/`` with ``labels.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.core import config
from pipeline.core.files import atomic_dir, hash_files, read_json, write_json
from pipeline.tracking.runs import Tracking


def fingerprint(params: dict[str, Any], rendered: Path, base_model: Path) -> str:
    """What a checkpoint must match to be resumed: training config, data and base weights."""
    relevant = json.dumps({k: params.get(k) for k in ("finetune", "trainer", "seed")}, sort_keys=True)
    data = hash_files([rendered / "train.jsonl", rendered / "val.jsonl"])
    weights = hash_files([base_model / "config.json", base_model / "model.safetensors"])
    return hashlib.sha256(f"{relevant}|{data}|{weights}".encode()).hexdigest()


def _matching_state(checkpoints: Path, expected: str) -> dict[str, Any] | None:
    """``resume.json`` if it belongs to this config and its checkpoint exists (read-only)."""
    state_file = checkpoints / "resume.json"
    state = read_json(state_file) if state_file.exists() else None
    return state if state and state["fingerprint"] == expected and (checkpoints / "last.ckpt").exists() else None


def _resume_state(checkpoints: Path, expected: str, client: Any) -> dict[str, Any] | None:
    """The run to resume, or None (then stale checkpoints are removed and their run closed)."""
    state = _matching_state(checkpoints, expected)
    if state:
        return state
    state_file = checkpoints / "resume.json"
    state = read_json(state_file) if state_file.exists() else None
    if state:  # a killed run that will never be resumed must not stay RUNNING in MLflow
        try:
            if client.get_run(state["run_id"]).info.status == "RUNNING":
                client.set_terminated(state["run_id"], "KILLED")
        except Exception:  # the run lives in another store: nothing to close here
            pass
    shutil.rmtree(checkpoints, ignore_errors=True)
    return None


class Terminated(SystemExit):
    """SIGTERM outside ``Trainer.fit`` (loading, saving, logging): stop and mark the run KILLED."""


def _handle_sigterm(fitting: list[bool]) -> None:
    """Inside fit, Lightning's own handler stops at the next batch and we checkpoint;
    elsewhere SIGTERM would kill the process with the MLflow run left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        if not fitting[0]:
            raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _open_run(cfg: config.PipelineConfig, params: dict[str, Any], rendered: Path, template: dict[str, Any],
              checkpoints: Path, expected: str, client: Any, tracking: Tracking,
              resume: dict[str, Any] | None) -> str:
    """Reopen the resumed MLflow run or create a new one (and its ``resume.json``); rank 0 only."""
    from pipeline.tracking import runs as mlf

    if resume:
        run_id: str = resume["run_id"]
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")
        print(f"train: resuming MLflow run {run_id} from {checkpoints / 'last.ckpt'}", flush=True)
        return run_id
    tags = mlf.run_tags(tracking.repo_root, hash_files([rendered / "train.jsonl", rendered / "val.jsonl"]),
                        template["hash"], tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id)
    run_id = mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, params, tags,
                           run_name=tracking.run_name or tracking.dvc_exp_name)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(checkpoints / "resume.json", {"fingerprint": expected, "run_id": run_id})
    return run_id


def run(cfg: config.PipelineConfig, params: dict[str, Any], rendered: Path, base_model: Path, out: Path,
        curves: Path, checkpoints: Path, tracking: Tracking) -> dict[str, Any]:
    """Train, save the result to ``out`` atomically, log everything to one MLflow run."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf
    from pipeline.training import encoder
    from pipeline.core.models import apply_finetune, check_tokenizer, load_causal_lm, load_tokenizer, model_kind
    from pipeline.core.plots import loss_curve
    from pipeline.training.module import (CheckpointOnSigterm, InstructionTuner, LossCurve, RenderedData, RngState, collate,
                                   prepare_for_batching, token_loss, trainer_settings)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Our sampler resumes mid-epoch itself (EpochSampler.skip), which Lightning cannot see.
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the one place global RNGs are seeded
    template = read_json(rendered / "template.json")
    tokenizer = load_tokenizer(base_model)
    # An encoder gets a new label head over the rendered labels; config validation made it finetune=full.
    classifier = model_kind(base_model) == encoder.KIND
    labels = read_json(rendered / encoder.LABELS_FILE) if classifier else None
    base = encoder.load_classifier(base_model, labels["labels"]) if labels else load_causal_lm(base_model)
    check_tokenizer(tokenizer, base, base_model)
    model = apply_finetune(base, cfg.finetune)
    if not classifier:
        prepare_for_batching(model, cfg.trainer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"train: {cfg.finetune.method}, {trainable:,} trainable of {total:,} parameters", flush=True)

    fitting = [False]
    _handle_sigterm(fitting)
    # Built under the store's lock: a fresh SQLite store creates and migrates its tables here.
    client = mlf.locked_write(tracking.uri, lambda: MlflowClient(tracking.uri))
    expected = fingerprint(params, rendered, base_model)
    # Under DDP, Lightning re-runs this script once per extra device (rank >= 1) when fit
    # starts. Only rank 0 touches MLflow, resume.json and the outputs; the other ranks find
    # the checkpoint rank 0 kept (it already removed stale ones before launching them).
    zero = rank_zero_only.rank == 0
    if zero:
        resume = _resume_state(checkpoints, expected, client)
        run_id = _open_run(cfg, params, rendered, template, checkpoints, expected, client, tracking, resume)
    else:
        resume, run_id = _matching_state(checkpoints, expected), None

    def close(status: str) -> None:
        if run_id is not None:
            client.set_terminated(run_id, status)

    try:
        t = cfg.trainer
        curve = LossCurve(curves)
        trainer = L.Trainer(
            **trainer_settings(t),
            logger=MLFlowLogger(experiment_name=cfg.tracking.experiment, tracking_uri=tracking.uri, run_id=run_id)
            if zero else False,
            # tqdm, not rich: it still draws when DVC pipes the output to a non-terminal.
            callbacks=[curve, RngState(), CheckpointOnSigterm(checkpoints / "last.ckpt"),
                       TQDMProgressBar(refresh_rate=1),
                       # Saved after each validation run, so the checkpoint holds its val loss too.
                       # one rolling checkpoint, last.ckpt links to it
                       ModelCheckpoint(dirpath=checkpoints, filename="step-{step}", save_last="link",
                                       save_top_k=1, save_on_train_epoch_end=False)],
            default_root_dir=checkpoints,
        )
        data = RenderedData(rendered, t.batch_size, tokenizer.pad_token_id, cfg.seed, t.num_workers,
                            encoder.collate if classifier else collate, t.batching, t.pack_length)
        start = time.perf_counter()
        # Only checkpoints this stage wrote itself are loaded, and with weights_only=True.
        fitting[0] = True
        trainer.fit(InstructionTuner(model, t, encoder.loss if classifier else token_loss), datamodule=data,
                    ckpt_path=str(checkpoints / "last.ckpt") if resume else None, weights_only=True)
        fitting[0] = False
        seconds = time.perf_counter() - start
        # FSDP holds each rank's shard only: gathering the full weights takes every rank.
        weights = trainer.strategy.lightning_module_state_dict() if t.strategy.name == "fsdp" else None
        if not trainer.is_global_zero:
            return {}
        curve.write()  # also when a resumed run had nothing left to do

        summary = {
            "method": cfg.finetune.method, "trainable_parameters": trainable, "parameters": total,
            "steps": trainer.global_step, "seconds": round(seconds, 1),
            "train_loss": curve.train[-1][1] if curve.train else None,
            "val_loss": curve.val[-1][1] if curve.val else None,
        }
        with atomic_dir(out) as tmp:
            state = {k.removeprefix("model."): v for k, v in weights.items()} if weights is not None else None
            if cfg.finetune.method == "lora":
                model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=state)
            else:
                model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state)
                tokenizer.save_pretrained(tmp / "model")
            write_json(tmp / "template.json", template)
            if labels:
                write_json(tmp / encoder.LABELS_FILE, labels)
            # Secret-looking keys never reach disk or MLflow (the file is logged as an artifact).
            (tmp / "config.yaml").write_text(yaml.safe_dump(mlf.redact_tree(params), sort_keys=False))
            write_json(tmp / "run.json", {"run_id": run_id, "experiment": cfg.tracking.experiment})
            write_json(tmp / "summary.json", summary)
        loss_curve(curves / "train_loss.csv", curves / "val_loss.csv", curves / "loss.png")
        client.log_artifact(run_id, str(out / "config.yaml"))
        client.log_artifact(run_id, str(out / "template.json"))
        client.log_artifacts(run_id, str(out / ("adapter" if cfg.finetune.method == "lora" else "model")),
                             artifact_path="adapter" if cfg.finetune.method == "lora" else "model")
        client.log_artifacts(run_id, str(curves), artifact_path="plots")
    except SIGTERMException:  # a SystemExit with code 0: DVC must not take it for success
        close("KILLED")
        raise Terminated(128 + signal.SIGTERM) from None
    except (KeyboardInterrupt, SystemExit):
        close("KILLED")
        raise
    except BaseException:
        close("FAILED")
        raise
    close("FINISHED")
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: nothing left to resume
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
    cfg, params = config.read(args.params)
    shutil.rmtree(args.curves, ignore_errors=True)
    run(cfg, params, args.rendered, args.base_model, args.out, args.curves, args.checkpoints,
        Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("train", main))

"""Stage 4, train: fine-tune the base model on the rendered rows with Lightning.

Reads ``finetune``, ``trainer``, ``seed`` and ``tracking``. Writes to ``--out`` the adapter
(``adapter/``, LoRA) or full weights (``model/``), both as safetensors, with the prompt
template (so evaluation renders prompts identically), the resolved config and a summary.
Loss curves go to ``--curves``; Lightning checkpoints to ``--checkpoints`` (removed when
training finishes). The MLflow run is tagged with the saved folder's digest, which is how
evaluate finds it (:mod:`pipeline.tracking.stage_run`): a run id in the folder would change
its hash on every run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import cli, config
from pipeline.core.errors import PipelineError
from pipeline.core.files import hash_files, read_json, read_jsonl, write_json
from pipeline.tracking import stage_run
from pipeline.tracking.runs import Tracking
from pipeline.training import fit


# The params sections dvc.yaml's train stage tracks: what config.yaml beside the weights records.
OWN_SECTIONS = ("finetune", "trainer", "seed", "tracking")


@dataclass(frozen=True)
class Paths:
    rendered: Path = cli.field("render stage output directory")
    base_model: Path = cli.field("base_model stage output")
    out: Path = cli.field("directory for the adapter / weights")
    curves: Path = cli.field("directory for loss curves")
    checkpoints: Path = cli.field("directory for Lightning checkpoints")


def fingerprint(params: dict[str, Any], rendered: Path, base_model: Path) -> str:
    """What a checkpoint must match to be resumed: training config, data and base weights."""
    relevant = json.dumps({k: params.get(k) for k in ("finetune", "trainer", "seed")}, sort_keys=True)
    data = hash_files([rendered / "train.jsonl", rendered / "val.jsonl"])
    # Every weight shard counts; a missing file is reported by the model load that follows, as a
    # one-line error in an open run.
    weights = hash_files([f for f in [base_model / "config.json", *sorted(base_model.glob("*.safetensors*"))]
                          if f.exists()])
    return hashlib.sha256(f"{relevant}|{data}|{weights}".encode()).hexdigest()


def _matching_state(checkpoints: Path, expected: str) -> dict[str, Any] | None:
    """``resume.json`` if it belongs to this config and its checkpoint exists (read-only)."""
    state_file = checkpoints / "resume.json"
    state = read_json(state_file) if state_file.exists() else None
    return state if state and state["fingerprint"] == expected and (checkpoints / "last.ckpt").exists() else None


def _resume_state(checkpoints: Path, expected: str, client: Any, uri: str) -> dict[str, Any] | None:
    """The run to resume, or None (then stale checkpoints are removed and their run closed)."""
    state = _matching_state(checkpoints, expected)
    if state:
        return state
    state_file = checkpoints / "resume.json"
    state = read_json(state_file) if state_file.exists() else None
    if state:  # a killed run that will never be resumed must not stay RUNNING in MLflow
        try:
            if client.get_run(state["run_id"]).info.status == "RUNNING":
                from pipeline.tracking.runs import locked_write

                locked_write(uri, lambda: client.set_terminated(state["run_id"], "KILLED"))
        except Exception:  # the run lives in another store: nothing to close here
            pass
    shutil.rmtree(checkpoints, ignore_errors=True)
    return None


def _open_run(cfg: config.PipelineConfig, params: dict[str, Any], rendered: Path, template: dict[str, Any],
              checkpoints: Path, expected: str, client: Any, tracking: Tracking,
              resume: dict[str, Any] | None) -> str:
    """Reopen the resumed MLflow run or create a new one (and its ``resume.json``); rank 0 only."""
    from pipeline.tracking import runs as mlf

    if resume:
        run_id: str = resume["run_id"]

        def reopen() -> None:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "resumed", "true")

        mlf.locked_write(tracking.uri, reopen)
        print(f"train: resuming MLflow run {run_id} from {checkpoints / 'last.ckpt'}", flush=True)
        return run_id
    tags = mlf.run_tags(tracking.repo_root, hash_files([rendered / "train.jsonl", rendered / "val.jsonl"]),
                        template["hash"], tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id)
    if tracking.job_dir:
        tags[stage_run.JOB_TAG] = tracking.job_dir
    run_id = mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, params, tags,
                           run_name=tracking.run_name or tracking.dvc_exp_name)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(checkpoints / "resume.json", {"fingerprint": expected, "run_id": run_id})
    return run_id


def run(cfg: config.PipelineConfig, paths: Paths, tracking: Tracking) -> dict[str, Any]:
    """Train, save the result to ``paths.out`` atomically, log everything to one MLflow run.

    Returns the summary and the MLflow ``run_id`` (an empty dict on DDP ranks other than 0).
    """
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    fit.quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the one place global RNGs are seeded
    params = config.to_dict(cfg)  # logged to MLflow whole; saved with the weights: the sections train reads
    own = {k: params[k] for k in OWN_SECTIONS}
    template = read_json(paths.rendered / "template.json")
    fitting = [False]
    stage_run.sigterm_outside(lambda: fitting[0])
    # Built under the store's lock: a fresh SQLite store creates and migrates its tables here.
    client = mlf.locked_write(tracking.uri, lambda: MlflowClient(tracking.uri))
    expected = fingerprint(params, paths.rendered, paths.base_model)
    # Under DDP, Lightning re-runs this script once per extra device (rank >= 1) when fit
    # starts. Only rank 0 touches MLflow, resume.json and the outputs; the other ranks find
    # the checkpoint rank 0 kept (it already removed stale ones before launching them).
    if rank_zero_only.rank == 0:
        resume = _resume_state(paths.checkpoints, expected, client, tracking.uri)
        run_id = _open_run(cfg, params, paths.rendered, template, paths.checkpoints, expected, client, tracking,
                           resume)
    else:
        resume, run_id = _matching_state(paths.checkpoints, expected), None

    def terminate(status: str) -> None:
        if run_id is not None:
            mlf.locked_write(tracking.uri, lambda: client.set_terminated(run_id, status))

    with stage_run.closing(terminate):  # opened before anything that can fail: the model, the data, the fit
        tokenizer, model, counts, plan = build(cfg, paths.base_model, paths.rendered)
        _keep_plan(paths.checkpoints, resume, plan.to_dict(), rank_zero_only.rank == 0)
        result = _fit(cfg, paths, model, tokenizer, tracking, run_id, resume is not None, fitting, counts, plan)
        if result is None:  # a DDP rank other than 0: rank 0 saves and logs
            return {}
        summary, weights = result
        _name_base(model, cfg)
        fit.save(paths.out, model, _weights(cfg), own, {"template.json": template, "summary.json": summary},
                 tokenizer=tokenizer if cfg.finetune.method != "lora" else None, state_dict=weights)
        _log(client, tracking.uri, run_id, paths, cfg)  # type: ignore[arg-type]
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: nothing left to resume
    print(f"train: {summary['steps']} steps, final train loss {summary['train_loss']}, "
          f"val loss {summary['val_loss']}; MLflow run {run_id}", flush=True)
    return {**summary, "run_id": run_id}


class PlanChanged(PipelineError):
    """A checkpoint was written under another batching plan than this process resolves."""


def _keep_plan(checkpoints: Path, resume: dict[str, Any] | None, plan: dict[str, Any], rank_zero: bool) -> None:
    """Record the batching plan in ``resume.json``; refuse to resume a run whose plan was different.

    Resuming skips the batches already consumed: under another plan (other rows per batch,
    micro-batches or packing) that count would point into a different batch sequence.
    """
    if resume is not None and resume.get("plan") not in (None, plan):
        raise PlanChanged(f"train: {checkpoints / 'last.ckpt'} was written with the batching plan {resume['plan']}, "
                          f"but this run resolves {plan}; set trainer.batching, pack_length and micro_batches "
                          f"to the checkpoint's values to resume, or delete {checkpoints} to start over")
    if rank_zero and (checkpoints / "resume.json").exists():
        write_json(checkpoints / "resume.json", {**read_json(checkpoints / "resume.json"), "plan": plan})


def _name_base(model: Any, cfg: config.PipelineConfig) -> None:
    """What peft writes into ``adapter_config.json`` and its model card, made the same for the same
    config: the base model named by its source (``model.path``), not by the folder it was loaded
    from (which differs between runners and machines), and the target modules in sorted order
    (peft keeps them in a set, whose order changes with each process's hash seed)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.name_or_path = core.config.name_or_path = cfg.model.path  # the card reads the config's
    for adapter in getattr(model, "peft_config", {}).values():
        adapter.base_model_name_or_path = cfg.model.path
        if isinstance(adapter.target_modules, (set, frozenset)):
            adapter.target_modules = sorted(adapter.target_modules)


def _weights(cfg: config.PipelineConfig) -> str:
    return "adapter" if cfg.finetune.method == "lora" else "model"


def build(cfg: config.PipelineConfig, base_model: Path, rendered: Path) -> tuple[Any, Any, tuple[int, int], Any]:
    """The tokenizer, the base model with its LoRA adapter (or all weights) trainable, its
    (trainable, total) parameter counts, taken before a strategy can shard them, and the batching
    plan for the train rows (:mod:`pipeline.training.plan`)."""
    from pipeline.core.files import read_jsonl
    from pipeline.core.models import apply_finetune, check_tokenizer, load_causal_lm, load_tokenizer
    from pipeline.training.module import prepare_for_batching

    tokenizer = load_tokenizer(base_model)
    base = load_causal_lm(base_model)
    check_tokenizer(tokenizer, base, base_model)
    model = apply_finetune(base, cfg.finetune)
    plan = prepare_for_batching(model, cfg.trainer, [len(r["input_ids"]) for r in read_jsonl(rendered / "train.jsonl")])
    n_trainable, total = fit.trainable(model)
    print(f"train: {cfg.finetune.method}, {n_trainable:,} trainable of {total:,} parameters; {plan.batching} batches"
          + (f" of one {plan.pack_length}-token row" if plan.batching == "packed" else f" of {plan.batch_size} rows")
          + (f", {plan.micro_batches} per optimizer step" if plan.micro_batches > 1 else "")
          + f" ({plan.why}), largest {plan.micro_batch_tokens} tokens, ~{plan.activation_mb:.0f} MB of activations"
          + (", recomputed in the backward pass" if plan.gradient_checkpointing else ""), flush=True)
    return tokenizer, model, (n_trainable, total), plan


def _fit(cfg: config.PipelineConfig, paths: Paths, model: Any, tokenizer: Any, tracking: Tracking,
         run_id: str | None, resume: bool, fitting: list[bool], counts: tuple[int, int],
         plan: Any) -> tuple[dict[str, Any], Any] | None:
    """Fit (resuming from ``last.ckpt`` when ``resume``); return the summary and, under FSDP, the
    gathered weights, or None on a rank other than 0."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.training.module import CheckpointOnSigterm, LossCurve, RenderedData, RngState, collate, token_loss

    t, ckpt = plan.trainer(cfg.trainer), paths.checkpoints  # rows per micro-batch, micro-batches accumulated
    curve = LossCurve(paths.curves)
    callbacks = [RngState(), CheckpointOnSigterm(ckpt / "last.ckpt"),
                 # Saved after each validation run, so the checkpoint holds its val loss too;
                 # one rolling checkpoint, last.ckpt links to it.
                 ModelCheckpoint(dirpath=ckpt, filename="step-{step}", save_last="link", save_top_k=1,
                                 save_on_train_epoch_end=False)]
    trainer = fit.build_trainer(t, curve, ckpt, cfg.tracking.experiment, tracking.uri, run_id, callbacks)
    data = RenderedData(paths.rendered, t.batch_size, tokenizer.pad_token_id, cfg.seed, t.num_workers, collate,
                        t.batching, t.pack_length)
    start = time.perf_counter()
    fitting[0] = True
    # Only checkpoints this stage wrote itself are loaded, and with weights_only=True.
    fit.fit_tuner(trainer, model, t, token_loss, data, ckpt_path=str(ckpt / "last.ckpt") if resume else None,
                  weights_only=True)
    fitting[0] = False
    seconds = time.perf_counter() - start
    # FSDP holds each rank's shard only: gathering the full weights takes every rank.
    weights = trainer.strategy.lightning_module_state_dict() if t.strategy.name == "fsdp" else None
    if not trainer.is_global_zero:
        return None
    curve.write()  # also when a resumed run had nothing left to do
    n_trainable, total = counts
    print(f"train: fit in {seconds:.0f}s", flush=True)
    state = {k.removeprefix("model."): v for k, v in weights.items()} if weights is not None else None
    return fit.summary(trainer, curve, method=cfg.finetune.method, trainable_parameters=n_trainable,
                       parameters=total, batching=plan.to_dict()), state


def _log(client: Any, uri: str, run_id: str, paths: Paths, cfg: config.PipelineConfig) -> None:
    """The loss plot, the saved files as artifacts, and the folder's digest as the run's tag."""
    from pipeline.core.plots import loss_curve

    curves = paths.curves
    loss_curve(curves / "train_loss.csv", curves / "val_loss.csv", curves / "loss.png")
    fit.log_outputs(client, uri, run_id, paths.out, _weights(cfg), curves, ("config.yaml", "template.json"),
                    {"base_model": cfg.model.name, "finetune": config.to_dict(cfg.finetune)},
                    f"{cfg.finetune.method} adapter" if cfg.finetune.method == "lora" else cfg.finetune.method)
    _log_datasets(client, uri, run_id, paths.rendered)


def _log_datasets(client: Any, uri: str, run_id: str, rendered: Path) -> None:
    """The train and val splits the run fitted on, as its MLflow datasets (digest: the file hash)."""
    from pipeline.tracking import runs as mlf
    from pipeline.tracking.views import log_datasets, split_dataset

    splits = {s: rendered / f"{s}.jsonl" for s in ("train", "val")}
    datasets = {s: split_dataset(read_jsonl(p), p, hash_files([p]), s) for s, p in splits.items()}
    mlf.locked_write(uri, lambda: log_datasets(client, run_id, datasets))


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    cfg = config.load(params)
    shutil.rmtree(paths.curves, ignore_errors=True)
    run(cfg, paths, Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("train", main))

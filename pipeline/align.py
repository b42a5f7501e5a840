"""Stage 5, align: preference tuning (DPO) of the instruction-tuned model.

Reads ``align``, ``prompt``, ``safety``, ``data.dedup``, ``seed`` and ``tracking``. With
``align.enabled`` false (``align=none``, the default) it writes only ``skipped.json`` to
``--out`` and ``--pairs`` and returns at once. Otherwise it builds preference pairs (the
embedded generator's, from the prepared splits, or a file's: :mod:`pipeline.data.preferences`),
renders both sides with the training template (completion-only labels), computes the SFT
model's log-probs of every pair once (the reference), and trains the SFT model's own weights
(its LoRA adapter, or all weights) with the DPO loss on train's Trainer. Writes the model to
``--out`` in train's layout (so evaluate loads it the same way), the held-out rendered pairs
and their counts to ``--pairs``, the loss curves to ``--curves``.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.core import cli, config
from pipeline.core.files import atomic_dir, hash_files, read_json, read_jsonl, write_json, write_jsonl
from pipeline.tracking import stage_run
from pipeline.tracking.runs import Tracking
from pipeline.training import fit

OWN_SECTIONS = ("align", "prompt", "seed", "tracking")
SKIPPED_FILE = "skipped.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Paths:
    prepared: Path = cli.field("prepare stage output (the splits the embedded pairs come from)")
    rendered: Path = cli.field("render stage output (the training template)")
    base_model: Path = cli.field("base_model stage output")
    tuned: Path = cli.field("train stage output: the SFT model, policy start and reference")
    out: Path = cli.field("directory for the aligned model (or the skip marker)")
    pairs: Path = cli.field("directory for the rendered held-out pairs and the pair counts")
    curves: Path = cli.field("directory for loss curves")
    checkpoints: Path = cli.field("directory for Lightning checkpoints (removed when aligning finishes)")


def skip(paths: Paths, reason: str) -> dict[str, Any]:
    """The markers that keep DVC's outputs whole when there is nothing to align."""
    for folder in (paths.out, paths.pairs):
        with atomic_dir(folder) as tmp:
            write_json(tmp / SKIPPED_FILE, {"reason": reason})
    paths.curves.mkdir(parents=True, exist_ok=True)
    for name in ("train_loss.csv", "val_loss.csv"):  # empty curves: `dvc plots` finds the files it names
        (paths.curves / name).write_text("step,loss\n", encoding="utf-8")
    print(f"align: skipped: {reason}", flush=True)
    return {"skipped": reason}


def run(cfg: config.PipelineConfig, paths: Paths, tracking: Tracking | None) -> dict[str, Any]:
    """Align (or write the skip markers); return the summary (and the MLflow ``run_id``, given ``tracking``)."""
    if not cfg.align.enabled:
        return skip(paths, "align.enabled is false (align=none)")
    import lightning as L
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    fit.quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the one place this stage seeds global RNGs
    params = config.to_dict(cfg)
    own = {k: params[k] for k in OWN_SECTIONS}
    template = read_json(paths.rendered / "template.json")
    fitting = [False]
    stage_run.sigterm_outside(lambda: fitting[0])
    client = mlf.locked_write(tracking.uri, lambda: MlflowClient(tracking.uri)) if tracking else None
    expected = fingerprint(own, paths)
    resume = _resume_state(paths.checkpoints, expected, client, tracking)
    run_id = _open_run(cfg, own, paths, template, tracking, resume, client) if tracking else None
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(paths.checkpoints / "resume.json", {"fingerprint": expected, "run_id": run_id})

    def terminate(status: str) -> None:
        if run_id is not None:
            mlf.locked_write(tracking.uri, lambda: client.set_terminated(run_id, status))  # type: ignore[union-attr]

    with stage_run.closing(terminate):  # opened before anything that can fail
        tokenizer, model = _policy(cfg, paths)
        rows, counts = _pair_rows(cfg, paths, tokenizer)
        with atomic_dir(paths.pairs) as tmp:
            write_jsonl(tmp / "test.jsonl", rows["test"])
            write_json(tmp / "counts.json", counts)
        summary = _fit(cfg, paths, model, tokenizer, rows, tracking, run_id, fitting, resume is not None)
        weights = "adapter" if (paths.tuned / "adapter").is_dir() else "model"  # train's layout, as loaded
        from pipeline.training.dpo import sorted_targets

        sorted_targets(model, cfg.model.path)
        fit.save(paths.out, model, weights, own, {"template.json": template, "summary.json": summary},
                 tokenizer=tokenizer if weights == "model" else None)
        _log(client, tracking.uri if tracking else None, run_id, paths, weights)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: nothing left to resume
    print(f"align: {summary['steps']} DPO steps on {counts['train']} pairs, final loss {summary['train_loss']}, "
          f"val loss {summary['val_loss']}; MLflow run {run_id}", flush=True)
    return {**summary, "run_id": run_id}


def _policy(cfg: config.PipelineConfig, paths: Paths) -> tuple[Any, Any]:
    """The tokenizer and the SFT model with the weights train trained made trainable again."""
    from pipeline.core.models import apply_finetune, load_causal_lm, load_tokenizer, require_safetensors

    tokenizer = load_tokenizer(paths.base_model)
    if (paths.tuned / "adapter").is_dir():
        from peft import PeftModel

        require_safetensors(paths.tuned / "adapter", "the LoRA adapter", "adapter_model.safetensors", strict=True)
        model = PeftModel.from_pretrained(load_causal_lm(paths.base_model), str(paths.tuned / "adapter"),
                                          is_trainable=True)
    else:
        model = apply_finetune(load_causal_lm(paths.tuned / "model"), cfg.finetune)
    n_trainable, total = fit.trainable(model)
    print(f"align: {n_trainable:,} trainable of {total:,} parameters (the SFT model's own)", flush=True)
    return tokenizer, model


def pairs_by_split(cfg: config.PipelineConfig, prepared: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """The preference pairs of each split, and what cleaning removed."""
    from pipeline.core.paths import search_roots
    from pipeline.data import preferences, safety, splits
    from pipeline.data.schema import Example

    d = cfg.align.data
    instruction = {s: [Example.from_dict(r) for r in read_jsonl(prepared / f"{s}.jsonl")] for s in SPLITS}
    if d.source == "embedded":
        out = {s: preferences.from_examples(instruction[s], cfg.seed) for s in SPLITS}
        counts: dict[str, Any] = {"source": "embedded"}
    else:
        pairs = preferences.load_file(cfg.align.data.path or "", d.format)  # type: ignore[arg-type]
        rules = safety.from_config(cfg.safety, search_roots())
        dd = cfg.data.dedup
        kept, counts = preferences.clean(pairs, instruction["val"] + instruction["test"], rules, dd.ngram,
                                         dd.ngram_threshold)
        out = splits.split(kept, d.val_fraction, d.test_fraction, cfg.seed)
        counts = {"source": "file", **counts}
    # The reference log-probs are computed for every training pair up front: only as many pairs as
    # the run's steps take (one epoch, each pair seen once), not the pairs it would never reach.
    t = cfg.align.trainer
    used = t.max_steps * t.batch_size * t.accumulate_grad_batches * t.devices
    counts["train_available"] = len(out["train"])
    for split, cap in (("train", min(used, d.max_pairs or used)), ("val", d.max_val_pairs)):
        rows = list(out[split])
        random.Random(f"{cfg.seed}:align:{split}").shuffle(rows)  # a cap keeps every task, not the first's
        out[split] = rows[:cap]
    return out, counts


def _pair_rows(cfg: config.PipelineConfig, paths: Paths, tokenizer: Any
               ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Each split's pair rows: both sides rendered with the training template (the last answer learnt)."""
    from pipeline.data.preferences import rejected
    from pipeline.prompting.rows import tokenize_split
    from pipeline.prompting.templates import Template
    from pipeline.training.dpo import pair_row

    template = Template.from_dict(read_json(paths.rendered / "template.json"))
    pairs, counts = pairs_by_split(cfg, paths.prepared)
    max_length = cfg.prompt.max_length if isinstance(cfg.prompt.max_length, int) else \
        max(len(r["input_ids"]) for r in read_jsonl(paths.rendered / "train.jsonl"))
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, items in pairs.items():
        sides = [tokenize_split([p.to_dict() for p in side], template, tokenizer, max_length, cfg.prompt.overflow,
                                last_only=True, side=cfg.prompt.truncate_side)[0]
                 for side in (items, [rejected(p) for p in items])]
        wrong = {r["id"]: r for r in sides[1]}
        rows[split] = [pair_row(r["id"], r, wrong[r["id"]]) for r in sides[0] if r["id"] in wrong]
        counts[split] = len(rows[split])
    if not rows["train"]:
        from pipeline.core.errors import DataError

        raise DataError([f"align: no training pairs ({counts}); align.data.source={cfg.align.data.source}"])
    return rows, counts


def _fit(cfg: config.PipelineConfig, paths: Paths, model: Any, tokenizer: Any, rows: dict[str, list[dict[str, Any]]],
         tracking: Tracking | None, run_id: str | None, fitting: list[bool], resume: bool) -> dict[str, Any]:
    """Cache the reference log-probs, then fit the policy with the DPO loss (from ``last.ckpt`` when ``resume``:
    the reference is the SFT model's again, so the cache is rebuilt the same)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.training.dpo import PairData, PreferenceTuner, reference_logps
    from pipeline.training.module import CheckpointOnSigterm, LossCurve, RngState

    a, t = cfg.align, cfg.align.trainer
    start = time.perf_counter()
    for split in ("train", "val"):
        reference_logps(model, rows[split], tokenizer.pad_token_id, t.batch_size)
    print(f"align: reference log-probs of {len(rows['train']) + len(rows['val'])} pairs in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="align-") as work:
        for split in ("train", "val"):
            write_jsonl(Path(work) / f"{split}.jsonl", rows[split])
        curve, ckpt = LossCurve(paths.curves), paths.checkpoints
        # As train: one rolling checkpoint after each validation, and one on SIGTERM.
        callbacks = [RngState(), CheckpointOnSigterm(ckpt / "last.ckpt"),
                     ModelCheckpoint(dirpath=ckpt, filename="step-{step}", save_last="link", save_top_k=1,
                                     save_on_train_epoch_end=False)]
        trainer = fit.build_trainer(t, curve, ckpt, cfg.tracking.experiment, tracking.uri if tracking else None,
                                    run_id, callbacks)
        from pipeline.training.dpo import collate_pairs

        data = PairData(Path(work), t.batch_size, tokenizer.pad_token_id, cfg.seed, t.num_workers, collate_pairs,
                        "dynamic", 0)  # a pair's two sides are never packed
        start = time.perf_counter()
        fitting[0] = True
        trainer.fit(PreferenceTuner(model, t, a.beta, a.label_smoothing), datamodule=data, weights_only=True,
                    ckpt_path=str(ckpt / "last.ckpt") if resume else None)
        fitting[0] = False
    print(f"align: fit in {time.perf_counter() - start:.0f}s", flush=True)
    curve.write()
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("rewards/", "logps/"))}
    return fit.summary(trainer, curve, method="dpo", beta=a.beta, label_smoothing=a.label_smoothing,
                       train_pairs=len(rows["train"]), final=dict(sorted(logged.items())))


def fingerprint(own: dict[str, Any], paths: Paths) -> str:
    """What a checkpoint must match to be resumed: the align config and the SFT model (its digest
    covers the base it was trained from through train's own config)."""
    import hashlib
    import json

    relevant = json.dumps(own["align"], sort_keys=True) + json.dumps(own["prompt"], sort_keys=True) + str(own["seed"])
    data = hash_files([paths.prepared / f"{s}.jsonl" for s in SPLITS])
    return hashlib.sha256(f"{relevant}|{data}|{stage_run.model_digest(paths.tuned)}".encode()).hexdigest()


def _resume_state(checkpoints: Path, expected: str, client: Any, tracking: Tracking | None) -> dict[str, Any] | None:
    """``resume.json`` when it matches and its checkpoint exists; else None, with stale checkpoints
    removed and a run they left RUNNING closed KILLED."""
    state_file = checkpoints / "resume.json"
    state = read_json(state_file) if state_file.exists() else None
    if state and state["fingerprint"] == expected and (checkpoints / "last.ckpt").exists():
        return state
    if state and state.get("run_id") and client is not None and tracking is not None:
        from pipeline.tracking.runs import locked_write

        try:
            if client.get_run(state["run_id"]).info.status == "RUNNING":
                locked_write(tracking.uri, lambda: client.set_terminated(state["run_id"], "KILLED"))
        except Exception:  # the run lives in another store: nothing to close here
            pass
    shutil.rmtree(checkpoints, ignore_errors=True)
    return None


def _open_run(cfg: config.PipelineConfig, own: dict[str, Any], paths: Paths, template: dict[str, Any],
              tracking: Tracking, resume: dict[str, Any] | None, client: Any) -> str:
    """Reopen the resumed MLflow run, or start a new one."""
    from pipeline.tracking import runs as mlf

    if resume and resume.get("run_id"):
        run_id: str = resume["run_id"]

        def reopen() -> None:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "resumed", "true")

        mlf.locked_write(tracking.uri, reopen)
        print(f"align: resuming MLflow run {run_id} from {paths.checkpoints / 'last.ckpt'}", flush=True)
        return run_id

    tags = {**mlf.run_tags(tracking.repo_root, hash_files([paths.prepared / "train.jsonl"]), template["hash"],
                           tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id),
            "arm": "aligned", "align.sft_digest": stage_run.model_digest(paths.tuned)}
    if tracking.job_dir:
        tags[stage_run.JOB_TAG] = tracking.job_dir
    return mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, mlf.redact_tree(own), tags,
                         run_name=f"align-dpo-beta{cfg.align.beta:g}")


def _log(client: Any, uri: str | None, run_id: str | None, paths: Paths, weights: str) -> None:
    from pipeline.core.plots import loss_curve

    loss_curve(paths.curves / "train_loss.csv", paths.curves / "val_loss.csv", paths.curves / "loss.png")
    if run_id is None or uri is None:
        return
    fit.log_outputs(client, uri, run_id, paths.out, weights, paths.curves, ("config.yaml", "summary.json"))


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    cfg = config.load(params)
    shutil.rmtree(paths.curves, ignore_errors=True)
    run(cfg, paths, Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("align", main))

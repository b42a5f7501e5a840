"""The Hydra app: ``python -m pipeline [overrides]`` runs every stage in-process as one job.

``python -m pipeline -m trainer.lr=1e-4,3e-4 finetune.lora.r=8,16`` is a multirun: a
grid with Hydra's basic sweeper, or whatever ``hydra/sweeper=`` and ``hydra/launcher=``
select (``optuna_eval``, ``joblib``, ``submitit_slurm``; see the README). Each job writes
training and evaluation outputs to its own Hydra job directory (``outputs/<date>/<time>/``
or ``multirun/<date>/<time>/<job>/``); the outputs of ``base_model``, ``prepare`` and
``render`` are content-addressed under ``outputs/cache/`` and shared by every job with the
same inputs (:mod:`pipeline.tracking.stage_cache`), and so is the encoder arm (``train_encoder``):
its key holds ``encoder`` and ``seed``, so a sweep over the causal LM's trainer.lr trains it
once (its metrics land in each job's run through evaluate). A job returns the sweep metric
(``hydra.callbacks.mlflow_sweep.metric``), which is what the Optuna sweeper optimizes.

This is an entry point, not a stage: it calls the stages' ``run`` functions the way
``dvc.yaml`` calls their ``main``; DVC keeps working on ``params.yaml`` as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import base_model, evaluate, prepare, render, train, train_encoder
from pipeline.core import config
from pipeline.tracking import stage_cache
from pipeline.tracking import runs as mlf
from pipeline.core.files import read_json, write_json
from pipeline.tracking.sweeps import Objective, Parent, eval_metrics, objective_value, read_parent

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_STAGES = ("base_model", "prepare", "render", "train_encoder")


@dataclass(frozen=True)
class JobContext:
    """Everything a job takes from Hydra and the environment, resolved once at the entry point."""

    job_dir: Path
    cache: Path
    repo_root: Path
    tracking: train.Tracking
    objective: Objective | None
    job_num: int | None
    sweeping: bool


def shared_stages(cfg: config.PipelineConfig, params: dict[str, Any], cache: Path, repo_root: Path) -> dict[str, Path]:
    """Build (or reuse) base_model, prepare, render and train_encoder; return each stage's entry directory."""
    recipes = stage_cache.stage_keys(stage_cache.read_specs(repo_root / "dvc.yaml"), params, repo_root,
                                     SHARED_STAGES)
    base, built = stage_cache.build_once(cache, "base_model", recipes["base_model"],
                                         lambda d: base_model.run(cfg.model, cfg.seed, d / "out"))
    _report("base_model", base, built)
    prepared, built = stage_cache.build_once(cache, "prepare", recipes["prepare"],
                                             lambda d: prepare.run(cfg.data, cfg.seed, d / "out", d / "stats.json"))
    _report("prepare", prepared, built)
    rendered, built = stage_cache.build_once(
        cache, "render", recipes["render"],
        lambda d: render.run(cfg.prompt, prepared / "out", base / "out", d / "out", d / "report.json"))
    _report("render", rendered, built)
    # No MLflow run of its own here: built once for many jobs, its scores go into each job's run.
    encoder_arm, built = stage_cache.build_once(
        cache, "train_encoder", recipes["train_encoder"],
        lambda d: train_encoder.run(cfg, params, prepared / "out", d / "out", d / "curves", None))
    _report("train_encoder", encoder_arm, built)
    return {"base_model": base, "prepare": prepared, "render": rendered, "train_encoder": encoder_arm}


def _report(stage: str, path: Path, built: bool) -> None:
    print(f"{stage}: {'built' if built else 'reused'} {path}", flush=True)


def run_pipeline(cfg: config.PipelineConfig, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """All six stages for one job; returns evaluate's metrics."""
    shared = shared_stages(cfg, params, ctx.cache, ctx.repo_root)
    base, prepared, rendered = shared["base_model"] / "out", shared["prepare"] / "out", shared["render"] / "out"
    job = ctx.job_dir
    write_json(job / "stages.json", {name: str(path) for name, path in shared.items()})
    tuned = job / "models" / "finetuned"
    train.run(cfg, params, rendered, base, tuned, job / "reports" / "train", job / "checkpoints", ctx.tracking)
    _tag_job(ctx, read_json(tuned / "run.json")["run_id"])
    return evaluate.run(cfg, rendered, prepared, base, tuned, job / "reports" / "eval", ctx.tracking,
                        encoder_dir=shared["train_encoder"] / "out")


def _tag_job(ctx: JobContext, run_id: str) -> None:
    """Tie the MLflow run to its Hydra job directory (and its number within a sweep)."""
    from mlflow.tracking import MlflowClient

    def tag() -> None:
        client = MlflowClient(ctx.tracking.uri)
        client.set_tag(run_id, "hydra.job_dir", str(ctx.job_dir))
        if ctx.job_num is not None:
            client.set_tag(run_id, "sweep.job_num", str(ctx.job_num))

    mlf.locked_write(ctx.tracking.uri, tag)


def job_context(hc: Any, cwd: Path) -> JobContext:
    """Read Hydra's runtime config once: job dir, sweep parent, objective, MLflow store."""
    sweeping = hc.mode == RunMode.MULTIRUN
    parent: Parent | None = read_parent(Path(hc.sweep.dir)) if sweeping else None
    cb = hc.callbacks.get("mlflow_sweep") if hc.callbacks else None
    objective = Objective(cb.metric, cb.direction) if cb is not None else None
    uri = parent.uri if parent else mlf.default_uri(cwd)
    tracking = train.Tracking(uri, mlf.store_root(cwd) / "mlartifacts", REPO_ROOT, None,
                              parent.run_id if parent else None, parent.sweep_id if parent else None,
                              mlf.redact_overrides(hc.job.override_dirname) or None)
    job_dir = config.check_job_dir(hc.runtime.output_dir, cwd, REPO_ROOT)  # a job there replaces checkpoints/
    return JobContext(job_dir, cwd / "outputs" / "cache", REPO_ROOT, tracking, objective,
                      hc.job.num if sweeping else None, sweeping)


def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task function: validate, run the stages, return the sweep metric's value."""
    params: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    pipeline_cfg = config.from_mapping(params, source="python -m pipeline")
    # Hydra 1.3 does not chdir into the job dir, so the cwd is where the user launched us.
    ctx = job_context(HydraConfig.get(), Path.cwd())
    metrics = run_pipeline(pipeline_cfg, params, ctx)
    if ctx.objective is None:
        return None
    if not ctx.sweeping and ctx.objective.metric not in eval_metrics(metrics):
        return None  # e.g. eval.models=[base] in a single run: nothing to optimize, nothing wrong
    return objective_value(ctx.objective, metrics)


main = hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="config", version_base="1.3")(run_job)

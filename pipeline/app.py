"""The Hydra app: ``python -m pipeline [overrides]`` runs every stage in-process as one job.

``python -m pipeline -m trainer.lr=1e-4,3e-4 finetune.lora.r=8,16`` is a multirun: a
grid with Hydra's basic sweeper, or whatever ``hydra/sweeper=`` and ``hydra/launcher=``
select (``optuna_eval``, ``joblib``, ``submitit_slurm``; see docs/experiments.md). Each job writes
training and evaluation outputs to its own Hydra job directory (``outputs/<date>/<time>/``
or ``multirun/<date>/<time>/<job>/``); the outputs of ``base_model``, ``prepare`` and
``render`` are content-addressed under ``outputs/cache/`` and shared by every job with the
same inputs (:mod:`pipeline.tracking.stage_cache`), and so is the encoder arm (``train_encoder``):
its key holds ``encoder`` and ``seed``, so a sweep over the causal LM's trainer.lr trains it
once (its metrics land in each job's run through evaluate). A job returns the sweep metric
(``hydra.callbacks.mlflow_sweep.metric``), which is what the Optuna sweeper optimizes.

This is an entry point, not a stage. It runs the same stages as ``dvc repro``, through the
same function each (the stage module's ``run(cfg, paths)``, which its ``main`` calls under
DVC), with the paths that ``dvc.yaml``'s ``cmd`` gives the stage, placed in the stage cache
or the job's folder (:class:`StageTable`). The stage list, the paths and the cache keys'
code deps all come from ``dvc.yaml``: the two runners cannot drift apart.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import align, base_model, evaluate, export, prepare, render, train, train_encoder
from pipeline.core import cli, config
from pipeline.core.files import write_json
from pipeline.tracking import runs as mlf
from pipeline.tracking import stage_cache
from pipeline.tracking.code_deps import stage_entry
from pipeline.tracking.sweeps import Objective, Parent, eval_metrics, objective_value, read_parent

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_STAGES = ("base_model", "prepare", "render", "train_encoder")  # built once per inputs, in this order


@dataclass(frozen=True)
class JobContext:
    """Everything a job takes from Hydra and the environment, resolved once at the entry point."""

    job_dir: Path
    cache: Path
    repo_root: Path
    tracking: mlf.Tracking
    objective: Objective | None
    job_num: int | None
    sweeping: bool


@dataclass(frozen=True)
class StageTable:
    """Each stage's command-line arguments and which stage writes each path, as ``dvc.yaml`` has them."""

    args: dict[str, list[str]]  # stage -> its cmd's arguments after ``python -m pipeline.<stage>``
    owner: dict[str, str]  # path -> the stage that writes it (a path in its cmd, not among its deps)
    entry: dict[str, str]  # stage -> the module its cmd runs (``pipeline.<stage>``)

    @classmethod
    def read(cls, dvc_yaml: Path) -> "StageTable":
        stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
        args, owner, entries = {}, {}, {}
        for name, st in stages.items():
            words = shlex.split(" ".join(str(st["cmd"]).split()))
            entries[name] = stage_entry(" ".join(words))
            args[name] = words[words.index(entries[name]) + 1:] if entries[name] in words else []
            deps = {d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])}
            owner.update({w: name for w in args[name][1::2] if w not in deps})
        return cls(args, owner, entries)

    def paths(self, stage: str, homes: dict[str, Path]) -> Any:
        """``stage``'s ``Paths``, parsed from its ``dvc.yaml`` arguments with every path placed in the
        home folder of the stage that writes it (``homes[stage]`` for its own outputs)."""
        words = list(self.args[stage])
        for i in range(1, len(words), 2):
            words[i] = str(homes[self.owner[words[i]]] / words[i])
        return cli.parse(None, importlib.import_module(self.entry[stage]).Paths, words)[1]


def shared_stages(cfg: config.PipelineConfig, table: StageTable, cache: Path, repo_root: Path) -> dict[str, Path]:
    """Build (or reuse) base_model, prepare, render and train_encoder in ``cache``; return their folders."""
    recipes = stage_cache.stage_keys(stage_cache.read_specs(repo_root / "dvc.yaml"), config.to_dict(cfg), repo_root,
                                     SHARED_STAGES)
    homes: dict[str, Path] = {}
    builders: dict[str, Callable[[Any], Any]] = {
        "base_model": lambda paths: base_model.run(cfg, paths),
        "prepare": lambda paths: prepare.run(cfg, paths),
        "render": lambda paths: render.run(cfg, paths),
        # No MLflow run of its own here: built once for many jobs, its scores go into each job's run.
        "train_encoder": lambda paths: train_encoder.run(cfg, paths, None),
    }
    for stage in SHARED_STAGES:
        home, built = stage_cache.build_once(
            cache, stage, recipes[stage], lambda d, s=stage: builders[s](table.paths(s, {**homes, s: d})))
        homes[stage] = home
        print(f"{stage}: {'built' if built else 'reused'} {home}", flush=True)
    return homes


def run_pipeline(cfg: config.PipelineConfig, ctx: JobContext) -> dict[str, Any]:
    """All eight stages for one job, each through its module's ``run``; returns evaluate's metrics."""
    table = StageTable.read(ctx.repo_root / "dvc.yaml")
    homes = shared_stages(cfg, table, ctx.cache, ctx.repo_root)
    write_json(ctx.job_dir / "stages.json", {name: str(path) for name, path in homes.items()})
    homes.update(train=ctx.job_dir, align=ctx.job_dir, evaluate=ctx.job_dir, export=ctx.job_dir)
    summary = train.run(cfg, table.paths("train", homes), ctx.tracking)
    if not summary:  # a DDP rank other than 0 (Lightning relaunches the app per device): rank 0 evaluates
        return {}
    _tag_job(ctx, summary["run_id"])
    # A job-dir stage like train: it starts from this job's SFT model (align=none: a marker only).
    align.run(cfg, table.paths("align", homes), ctx.tracking)
    metrics = evaluate.run(cfg, table.paths("evaluate", homes), ctx.tracking)
    export.run(cfg, table.paths("export", homes))  # in the job's folder, as train's model is
    return metrics


def _tag_job(ctx: JobContext, run_id: str) -> None:
    """The run's number within its sweep (train tagged it with the job's folder when it opened it)."""
    from mlflow.tracking import MlflowClient

    if ctx.job_num is not None:
        mlf.locked_write(ctx.tracking.uri,
                         lambda: MlflowClient(ctx.tracking.uri).set_tag(run_id, "sweep.job_num", str(ctx.job_num)))


def job_context(hc: Any, cwd: Path) -> JobContext:
    """Read Hydra's runtime config once: job dir, sweep parent, objective, MLflow store."""
    sweeping = hc.mode == RunMode.MULTIRUN
    parent: Parent | None = read_parent(Path(hc.sweep.dir)) if sweeping else None
    cb = hc.callbacks.get("mlflow_sweep") if hc.callbacks else None
    objective = Objective(cb.metric, cb.direction) if cb is not None else None
    uri = parent.uri if parent else mlf.default_uri(cwd)
    job_dir = config.check_job_dir(hc.runtime.output_dir, cwd, REPO_ROOT)  # a job there replaces checkpoints/
    tracking = mlf.Tracking(uri, mlf.store_root(cwd) / "mlartifacts", REPO_ROOT, None,
                            parent.run_id if parent else None, parent.sweep_id if parent else None,
                            mlf.redact_overrides(hc.job.override_dirname) or None, str(job_dir))
    return JobContext(job_dir, cwd / "outputs" / "cache", REPO_ROOT, tracking, objective,
                      hc.job.num if sweeping else None, sweeping)


def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task function: validate, run the stages, return the sweep metric's value.

    A failure a user can fix (bad config or data, a missing file) ends the job with one
    ``pipeline: error: ...`` line and exit code 1, as the stages' own entry points do.
    """
    try:
        return _job(cfg)
    except Exception as err:  # noqa: BLE001 - sorted into known and unknown right below
        message = cli.describe(err)
        if message is None:
            raise
        print(f"pipeline: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def _job(cfg: DictConfig) -> float | None:
    params: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    pipeline_cfg = config.from_mapping(params, source="python -m pipeline")
    missing = pipeline_cfg.data.missing_files(Path.cwd())  # before the first stage builds a model
    if missing:
        raise config.ConfigError(missing, "the data config")
    # Hydra 1.3 does not chdir into the job dir, so the cwd is where the user launched us.
    ctx = job_context(HydraConfig.get(), Path.cwd())
    metrics = run_pipeline(pipeline_cfg, ctx)
    if ctx.objective is None or not metrics:
        return None
    if not ctx.sweeping and ctx.objective.metric not in eval_metrics(metrics):
        return None  # e.g. eval.models=[base] in a single run: nothing to optimize, nothing wrong
    return objective_value(ctx.objective, metrics)


main = hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="config", version_base="1.3")(run_job)

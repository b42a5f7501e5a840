"""MLflow parent runs for Hydra multiruns, and the metric a sweep optimizes.

``conf/hydra/callbacks/mlflow_sweep.yaml`` installs :class:`MlflowSweep`. When a
multirun starts (``python -m pipeline -m ...``) it opens a parent run holding the sweep's
definition (overrides, search space, sweeper, launcher, metric) and writes its id to
``<sweep dir>/mlflow_sweep.json``; every job reads that file and nests its own run under
the parent (tag ``mlflow.parentRunId``) with the sweep id (tag ``sweep.id``). A file, not
an environment variable, because launchers such as submitit start jobs on other
machines that share only the file system. When the multirun ends, the parent gets the
best value of the metric over its children and the id of the run that reached it. When it
stops early (a job raised, which ends Hydra's multirun without ``on_multirun_end``, or the
user interrupted it), an exit hook closes the parent as FAILED with what its children got
so far, instead of leaving it RUNNING in the dashboard.
"""

from __future__ import annotations

import atexit
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.tracking import runs as tracking
from pipeline.tracking import views
from pipeline.core.config import flatten
from pipeline.core.files import read_json, write_json

PARENT_FILE = "mlflow_sweep.json"
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class Objective:
    """The metric a sweep is judged by (evaluate's name, ``eval.tuned.overall.score``) and which way is better."""

    metric: str
    direction: str

    @property
    def run_metric(self) -> str:
        """The metric's name in a run: evaluate logs in sections (``eval_tuned/overall/score``)."""
        return views.eval_metric_name(self.metric.removeprefix("eval.")) if self.metric.startswith("eval.") \
            else self.metric

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"hydra.callbacks.mlflow_sweep.direction: {self.direction!r} is not one of "
                             f"{', '.join(DIRECTIONS)}")

    def best(self, values: Mapping[str, float]) -> tuple[str, float] | None:
        """``(key, value)`` of the best of ``values``, or None if empty."""
        if not values:
            return None
        pick = max if self.direction == "maximize" else min
        key = pick(values, key=values.__getitem__)
        return key, values[key]


@dataclass(frozen=True)
class Parent:
    """What a job needs to nest its run under the sweep's parent run."""

    run_id: str
    sweep_id: str
    uri: str


def eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """evaluate's metrics dict under the names MLflow shows (``eval.tuned.overall.score``)."""
    return {f"eval.{k}": float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}


def objective_value(objective: Objective, metrics: Mapping[str, Any]) -> float:
    """The objective's value in evaluate's metrics; the error lists what there is."""
    flat = eval_metrics(metrics)
    if objective.metric not in flat:
        raise KeyError(f"sweep metric {objective.metric!r} (hydra.callbacks.mlflow_sweep.metric) is not among "
                       f"the evaluation metrics: {', '.join(sorted(flat))}")
    return flat[objective.metric]


def read_parent(sweep_dir: Path) -> Parent | None:
    """The parent run written by :class:`MlflowSweep` for ``sweep_dir``, if any."""
    path = sweep_dir / PARENT_FILE
    if not path.exists():
        return None
    info = read_json(path)
    return Parent(info["run_id"], info["sweep_id"], info["uri"])


def sweep_definition(config: DictConfig, objective: Objective) -> dict[str, str]:
    """The sweep as MLflow params: overrides, search space, sweeper and launcher, objective."""
    hydra_cfg = config.hydra
    sweeper = OmegaConf.to_container(hydra_cfg.sweeper, resolve=True)
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True)
    overrides = list(hydra_cfg.overrides.task)
    definition = {  # start_run redacts each param by its key; one joined string needs its items redacted
        "sweep.overrides": tracking.redact_overrides(" ".join(overrides)),
        "sweep.sweeper": str(sweeper.get("_target_", "")).rsplit(".", 1)[-1],
        "sweep.launcher": str(launcher.get("_target_", "")).rsplit(".", 1)[-1],
        "sweep.metric": objective.metric,
        "sweep.direction": objective.direction,
    }
    for item in overrides:  # one param per swept key: sweep.override.trainer.lr = 1e-4,3e-4
        key, _, value = item.partition("=")
        definition[f"sweep.override.{key.lstrip('+~')}"] = value
    for key, value in (sweeper.get("params") or {}).items():  # Optuna's search space
        definition[f"sweep.space.{key}"] = str(value)
    for key in ("n_trials", "n_jobs", "direction", "max_batch_size"):
        if key in sweeper:
            definition[f"sweep.sweeper.{key}"] = str(sweeper[key])
    for key in ("n_jobs", "partition", "gpus_per_node", "timeout_min"):
        if key in launcher:
            definition[f"sweep.launcher.{key}"] = str(launcher[key])
    return definition


class MlflowSweep(Callback):
    """Hydra callback: a parent MLflow run around each multirun (see the module docstring)."""

    def __init__(self, metric: str, direction: str) -> None:
        self.objective = Objective(metric, direction)
        self._open: Path | None = None  # the sweep dir whose parent run is still open

    def _close_if_open(self) -> None:
        """Exit hook: the multirun ended without on_multirun_end (a job failed, or an interrupt)."""
        if self._open is None:
            return
        sweep_dir, self._open = self._open, None
        parent = read_parent(sweep_dir)
        if parent is not None:
            summary = summarize(parent, self.objective, sweep_dir, stopped=True)
            print(f"sweep {parent.sweep_id}: stopped early after {summary['runs']} runs; "
                  f"MLflow parent run {parent.run_id} closed as FAILED", flush=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        cwd = Path.cwd()  # Hydra's entry point: jobs resolve the same default store from here
        uri = tracking.default_uri(cwd)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        tags = {**tracking.git_tags(Path(__file__).resolve().parents[2]), tracking.SWEEP_TAG: sweep_id,
                "sweep.role": "parent", "sweep.dir": str(sweep_dir.resolve())}
        run_id = tracking.start_run(uri, config.tracking.experiment, tracking.store_root(cwd) / "mlartifacts",
                                    sweep_definition(config, self.objective), tags, run_name=f"sweep {sweep_id}")
        write_json(sweep_dir / PARENT_FILE, {"run_id": run_id, "sweep_id": sweep_id, "uri": uri,
                                             "experiment": config.tracking.experiment})
        print(f"sweep {sweep_id}: MLflow parent run {run_id}", flush=True)
        self._open = sweep_dir
        atexit.register(self._close_if_open)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self._open = None
        parent = read_parent(sweep_dir)
        if parent is None:
            return
        summary = summarize(parent, self.objective, sweep_dir)
        print(f"sweep {parent.sweep_id}: {summary['runs']} runs, best {self.objective.metric} = "
              f"{summary.get('best_value')} (run {summary.get('best_run_id')})", flush=True)


def summarize(parent: Parent, objective: Objective, sweep_dir: Path, stopped: bool = False) -> dict[str, Any]:
    """Log the best child value onto the parent, attach Hydra's sweep files, close the parent
    (FAILED when no child has the metric, or when the multirun ``stopped`` before its end)."""
    from mlflow.tracking import MlflowClient

    children = tracking.child_runs(parent.uri, parent.run_id)
    key = objective.run_metric
    values = {r.info.run_id: r.data.metrics[key] for r in children if key in r.data.metrics}
    best = objective.best(values)
    summary: dict[str, Any] = {"runs": len(children), "with_metric": len(values), "stopped_early": stopped}
    client = MlflowClient(parent.uri)

    def log() -> None:
        client.log_metric(parent.run_id, "sweep.runs", len(children))
        if best is not None:
            summary.update(best_run_id=best[0], best_value=best[1])
            client.log_metric(parent.run_id, f"best.{objective.metric}", best[1])
            client.set_tag(parent.run_id, "best.run_id", best[0])
        for name in ("multirun.yaml", "optimization_results.yaml"):
            if (sweep_dir / name).exists():
                _log_redacted(client, parent.run_id, sweep_dir / name)
        if stopped:
            client.set_tag(parent.run_id, "sweep.stopped_early",
                           "the multirun ended before its last job (a job failed, or it was interrupted); "
                           "see the jobs' logs under sweep.dir")
        client.set_terminated(parent.run_id, "FINISHED" if best is not None and not stopped else "FAILED")

    tracking.locked_write(parent.uri, log)
    write_json(sweep_dir / "summary.json", summary)
    return summary


def _log_redacted(client: Any, run_id: str, path: Path) -> None:
    """Upload a Hydra YAML file (its overrides hold any secret given on the command line) redacted."""
    import tempfile

    import yaml

    with open(path, encoding="utf-8") as fh:
        tree = yaml.safe_load(fh)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(tracking.redacted_yaml(tree), encoding="utf-8")
        client.log_artifact(run_id, str(copy), artifact_path="sweep")

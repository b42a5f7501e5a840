"""MLflow bookkeeping shared by the train and evaluate stages.

One MLflow run per experiment: train creates it (params, tags, step metrics, adapter),
evaluate reopens it (eval metrics, predictions table, plots). The store defaults to
``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` at the repository root; the
entry points pass ``MLFLOW_TRACKING_URI`` in when it is set.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.config import flatten

SECRET_PARTS = re.compile(r"(^|[._-])(token|password|passwd|secret|key|apikey|api_key|credentials?)($|[._-])", re.I)
REDACTED = "***"


def default_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store at ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Replace values whose dotted key looks like a secret (token, password, key, ...)."""
    return {k: (REDACTED if SECRET_PARTS.search(k) and v not in (None, "") else v) for k, v in params.items()}


def git_tags(cwd: Path) -> dict[str, str]:
    """Commit and dirty flag of the repository at ``cwd`` (empty outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def params_for_logging(params: Mapping[str, Any]) -> dict[str, str]:
    """Flattened, redacted, stringified params with DVC's dotted names."""
    flat = redact(flatten(params))
    return {k: ("null" if v is None else str(v))[:6000] for k, v in flat.items()}


def ensure_experiment(uri: str, name: str, artifact_root: Path) -> str:
    """Experiment id, creating it with artifacts under ``artifact_root`` for local stores."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if not uri.startswith(("http://", "https://", "databricks")) else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another job created it between our get and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, experiment: str, artifact_root: Path, params: Mapping[str, Any],
              tags: Mapping[str, str], run_name: str | None = None) -> str:
    """Create a run with params and tags; return its id (the run stays open)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = ensure_experiment(uri, experiment, artifact_root)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    items = [Param(k, v) for k, v in params_for_logging(params).items()]
    for i in range(0, len(items), 100):  # the REST API caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


@contextlib.contextmanager
def active_run(uri: str, run_id: str) -> Iterator[Any]:
    """Reopen ``run_id`` for fluent logging; mark it FAILED or KILLED if the body raises."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def run_tags(root: Path, data_hash: str, template_hash: str, exp_name: str | None) -> dict[str, str]:
    """The tags that tie a run to its code, data and prompt (and DVC experiment, if any)."""
    tags = {**git_tags(root), "data.hash": data_hash, "template.hash": template_hash}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    return tags

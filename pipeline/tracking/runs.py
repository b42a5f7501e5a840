"""MLflow bookkeeping shared by the train and evaluate stages.

One MLflow run per experiment: train creates it (params, tags, step metrics, adapter),
evaluate reopens it (eval metrics, predictions table, plots). The store defaults to
``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` at the repository root; the
entry points pass ``MLFLOW_TRACKING_URI`` in when it is set. A sweep adds a parent run
(see :mod:`pipeline.tracking.sweeps`) and each job's run becomes its child.

Parallel jobs share one SQLite file. SQLite allows one writer at a time and MLflow
waits 20 s for a lock, but a fresh store's table creation and long bursts of writes can
still fail with "database is locked"; the writes made here hold a file lock next to the
database and retry with backoff (:func:`write_lock`, :func:`retry_locked`).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from pipeline.core.config import flatten

# The last name of a dotted key (hub_token, api_key, password, aws_secret_access_key), not any
# segment: num_key_value_heads and keywords are not secrets.
SECRET_PARTS = re.compile(r"(^|_)(token|password|passwd|secret|key|apikey|credentials?)$", re.I)
REDACTED = "***"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
SWEEP_TAG = "sweep.id"
T = TypeVar("T")


def store_root(root: Path) -> Path:
    """Where the default store lives: DVC's ``DVC_ROOT`` when set, else ``root``.

    ``dvc exp run --queue`` / ``--temp`` run each experiment in a temporary copy of the
    repository that is deleted afterwards; DVC points ``DVC_ROOT`` at the real
    repository, so runs land in its ``mlflow.db`` instead of vanishing with the copy.
    """
    return Path(os.environ.get("DVC_ROOT") or root)


@dataclass(frozen=True)
class Tracking:
    """Where MLflow writes; resolved from the environment by the entry points only."""

    uri: str
    artifact_root: Path
    repo_root: Path
    dvc_exp_name: str | None = None
    parent_run_id: str | None = None  # set by a sweep: this run is nested under the sweep's run
    sweep_id: str | None = None
    run_name: str | None = None  # defaults to the DVC experiment name

    @classmethod
    def from_env(cls, root: Path) -> "Tracking":
        return cls(default_uri(root), store_root(root) / "mlartifacts", root, os.environ.get("DVC_EXP_NAME"))


def default_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store at :func:`store_root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(store_root(root) / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def write_lock(uri: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold ``<database>.lock`` while writing to a SQLite store (no-op for servers)."""
    from filelock import FileLock

    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=timeout):
        yield


def is_locked_error(err: BaseException) -> bool:
    """True for SQLite's transient "database is locked" / "busy" errors, however MLflow wraps them."""
    text = f"{err} {err.__cause__ or ''}".lower()
    return "database is locked" in text or "database is busy" in text


def retry_locked(fn: Callable[[], T], attempts: int = 8, first_delay: float = 0.2) -> T:
    """Call ``fn``; on a locked-database error wait (exponential backoff, jitter) and retry."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException or sqlalchemy's OperationalError
            if attempt == attempts - 1 or not is_locked_error(err):
                raise
            time.sleep(first_delay * 2 ** attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def locked_write(uri: str, fn: Callable[[], T]) -> T:
    """``fn`` under the store's write lock, retried on a locked database."""
    def attempt() -> T:
        with write_lock(uri):
            return fn()

    return retry_locked(attempt)


def _is_secret(dotted_key: str) -> bool:
    return bool(SECRET_PARTS.search(dotted_key.rsplit(".", 1)[-1]))


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Replace values whose dotted key looks like a secret (token, password, key, ...)."""
    return {k: (REDACTED if _is_secret(k) and v not in (None, "") else v) for k, v in params.items()}


def redact_tree(tree: Any, prefix: str = "") -> Any:
    """``redact`` for a nested config, keeping its shape (for the saved config.yaml)."""
    if isinstance(tree, Mapping):
        return {k: redact_tree(v, f"{prefix}{k}.") for k, v in tree.items()}
    key = prefix.rstrip(".")
    return REDACTED if key and _is_secret(key) and tree not in (None, "") else tree


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

    def get_or_create() -> str:
        # The client is built under the lock too: a fresh SQLite store creates its tables then.
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = artifact_root.resolve().as_uri() if not uri.startswith(("http://", "https://", "databricks")) else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # another process (e.g. on a server store) created it between our get and create
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    return locked_write(uri, get_or_create)


def start_run(uri: str, experiment: str, artifact_root: Path, params: Mapping[str, Any],
              tags: Mapping[str, str], run_name: str | None = None) -> str:
    """Create a run with params and tags; return its id (the run stays open)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    exp_id = ensure_experiment(uri, experiment, artifact_root)
    items = [Param(k, v) for k, v in params_for_logging(params).items()]

    def create() -> str:
        client = MlflowClient(uri)
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        for i in range(0, len(items), 100):  # the REST API caps a batch at 100 params
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    return locked_write(uri, create)


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


def run_tags(root: Path, data_hash: str, template_hash: str, exp_name: str | None,
             parent_run_id: str | None = None, sweep_id: str | None = None) -> dict[str, str]:
    """The tags that tie a run to its code, data and prompt (and DVC experiment or sweep, if any)."""
    tags = {**git_tags(root), "data.hash": data_hash, "template.hash": template_hash}
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    if sweep_id:
        tags[SWEEP_TAG] = sweep_id
    return tags


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    """Every run nested under ``parent_run_id`` (any status), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=50000, order_by=["attributes.start_time ASC"])
    return list(runs)

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

Secrets never reach the store: params, run names, tags and uploaded config files go
through :func:`redact_tree` / :func:`redact_text` (secret-looking key names, and values
that carry credentials whatever their key: URL userinfo, ``key=value`` override items,
well-known token shapes). A tracking URI with credentials in it is refused
(:func:`check_uri`), and MLflow is told not to print run URLs.
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
from urllib.parse import urlsplit

from pipeline.core.config import flatten
from pipeline.core.errors import ConfigError
from pipeline.tracking import views

# A key is judged by the words of its last dotted name (snake_case, kebab-case or camelCase:
# hubToken -> hub, token). Any of these words makes it a secret...
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
                          "auth", "authorization", "oauth", "apikey", "cookie", "private", "privatekey", "bearer"})
# ...and so do "token" and "key" as the last word (hub_token, api_key) or before one of TAILS
# (access_key_id, token_file); num_key_value_heads, keywords_file and pad_token_id are not secrets.
SECRET_LAST = frozenset({"token", "key"})
SECRET_TAILS = frozenset({"id", "file", "path"})
NOT_SECRET_TOKENS = frozenset({"pad", "bos", "eos", "unk", "sep", "cls", "mask"})  # tokenizer special tokens
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# Credentials in a value, whatever the key: userinfo in a URL (postgresql://user:pass@host),
# `name=value` / `name: value` pairs whose name is a secret (Hydra overrides, override_dirname,
# inline mappings), a bearer header, and the shapes of common API tokens.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/@?#]+@")
_PAIR = re.compile(r"(?P<name>[+~]*[A-Za-z_][\w.\-]*)(?P<sep>\s*[:=]\s*)(?P<value>[^\s,}\]]+)")
_BEARER = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{8,}")
_TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}"
                           r"|github_pat_\w{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9\-]{10,})\b")
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
    job_dir: str | None = None  # the Hydra app's job folder: tags the job's runs, so evaluate finds its own

    @classmethod
    def from_env(cls, root: Path) -> "Tracking":
        return cls(default_uri(root), store_root(root) / "mlartifacts", root, os.environ.get("DVC_EXP_NAME"))


def default_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set (refused with credentials in it), else the SQLite store at
    :func:`store_root`. Entry points call this, so it also quiets MLflow's URL printing."""
    quiet_mlflow()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return check_uri(uri) if uri else f"sqlite:///{(store_root(root) / 'mlflow.db').resolve()}"


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


def is_secret_key(dotted_key: str) -> bool:
    """True when the last name of ``dotted_key`` names a secret (see SECRET_WORDS)."""
    words = [w.lower() for w in _WORD.findall(str(dotted_key).rsplit(".", 1)[-1])]
    if any(w in SECRET_WORDS for w in words):
        return True
    for i, word in enumerate(words):
        last = i == len(words) - 1
        if word in SECRET_LAST and (last or words[i + 1] in SECRET_TAILS):
            return not (word == "token" and i > 0 and words[i - 1] in NOT_SECRET_TOKENS)
    return False


def _secret_value(value: Any) -> bool:
    return value not in (None, "") and not isinstance(value, bool)  # a flag is no secret


def redact_text(text: str) -> str:
    """``text`` with credentials in it replaced by ``***`` (URL userinfo, secret ``name=value`` pairs, tokens)."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _PAIR.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}" if is_secret_key(m["name"].lstrip("+~"))
                     and m["value"] != REDACTED else m.group(0), text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def redact_overrides(overrides: str) -> str:
    """Hydra overrides as one string (``a.api_key=x,b=y``: ``override_dirname``, or a joined
    command line) with the values of secret keys and any credentials replaced by ``***``."""
    return redact_text(overrides)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat params with secret-looking keys (token, password, key, ...) and credentials in values redacted."""
    return {k: redact_tree(v, f"{k}.") for k, v in params.items()}


def redact_tree(tree: Any, prefix: str = "") -> Any:
    """``redact`` for a nested config, keeping its shape (for the saved config.yaml); lists are
    entered, and every string is searched for credentials (:func:`redact_text`)."""
    key = prefix.rstrip(".")
    if isinstance(tree, Mapping):
        return {k: redact_tree(v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v, prefix) for v in tree]
    if key and is_secret_key(key) and _secret_value(tree):
        return REDACTED
    return redact_text(tree) if isinstance(tree, str) else tree


def redacted_yaml(tree: Any) -> str:
    """YAML text of ``tree`` after :func:`redact_tree`: what a stage saves and uploads as ``config.yaml``."""
    import yaml

    return yaml.safe_dump(redact_tree(tree), sort_keys=False)


def check_uri(uri: str) -> str:
    """``uri``, refused (ConfigError) when it carries credentials: MLflow prints run URLs with their
    userinfo, and sweeps store the URI in ``mlflow_sweep.json``."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    shown = redact_text(uri)
    if parts.scheme in ("http", "https"):
        fix = "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
    else:
        fix = "keep the password out of the URI (e.g. in ~/.pgpass for PostgreSQL)"
    if parts.password is None and parts.scheme not in ("http", "https"):
        return uri  # a database user name alone (its password in the driver's own file) carries no secret
    raise ConfigError([f"MLFLOW_TRACKING_URI: credentials in the URI ({shown}) would be printed and stored; {fix}"],
                      "the environment")


def quiet_mlflow() -> None:
    """Stop MLflow printing ``View run ... at: <url>`` when a run ends (unless the user asked for it)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


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
    """Flattened, redacted, stringified params with DVC's dotted names (a list stays one param)."""
    flat = flatten(redact_tree(params))
    return {k: ("null" if v is None else str(v))[:6000] for k, v in flat.items()}


def ensure_experiment(uri: str, name: str, artifact_root: Path) -> str:
    """Experiment id, creating it with artifacts under ``artifact_root`` for local stores."""
    from mlflow.tracking import MlflowClient

    def get_or_create() -> str:
        # The client is built under the lock too: a fresh SQLite store creates its tables then.
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if views.EXPERIMENT_KIND_TAG not in exp.tags:  # made before the kind was set; a user's choice stays
                client.set_experiment_tag(exp.experiment_id, views.EXPERIMENT_KIND_TAG, views.EXPERIMENT_KIND)
            return exp.experiment_id
        location = artifact_root.resolve().as_uri() if not uri.startswith(("http://", "https://", "databricks")) else None
        try:  # the kind: MLflow's UI opens the model-training view, not the GenAI one
            return client.create_experiment(name, artifact_location=location,
                                            tags={views.EXPERIMENT_KIND_TAG: views.EXPERIMENT_KIND})
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

    quiet_mlflow()
    exp_id = ensure_experiment(uri, experiment, artifact_root)
    items = [Param(k, v) for k, v in params_for_logging(params).items()]
    name = redact_text(run_name) if run_name else run_name  # e.g. Hydra's override_dirname
    safe_tags = {k: redact_text(str(v)) for k, v in tags.items()}

    def create() -> str:
        client = MlflowClient(uri)
        run = client.create_run(exp_id, run_name=name, tags=safe_tags)
        for i in range(0, len(items), 100):  # the REST API caps a batch at 100 params
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    return locked_write(uri, create)


@contextlib.contextmanager
def active_run(uri: str, run_id: str) -> Iterator[Any]:
    """Reopen ``run_id`` for fluent logging; mark it FAILED or KILLED if the body raises."""
    import mlflow

    quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    # Reopening sets the run RUNNING and ending it sets its status: writes, so under the store's lock.
    run = locked_write(uri, lambda: mlflow.start_run(run_id=run_id))

    def end(status: str) -> None:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:  # a retry: end_run had already popped the run before its write failed
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).set_terminated(run_id, status)

    try:
        yield run
    except KeyboardInterrupt:
        locked_write(uri, lambda: end("KILLED"))
        raise
    except BaseException:
        locked_write(uri, lambda: end("FAILED"))
        raise
    locked_write(uri, lambda: end("FINISHED"))


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

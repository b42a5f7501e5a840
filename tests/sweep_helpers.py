"""Shared by the sweep tests: run the real CLIs in a scratch directory with this checkout's code."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    """This venv and checkout first; no MLflow/DVC settings leaking in from the caller."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = f"{REPO}{os.pathsep}{out['PYTHONPATH']}" if out.get("PYTHONPATH") else str(REPO)
    out.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost", **extra)
    return out


def sh(cmd: Sequence[str], cwd: Path, timeout: float = 900, **extra_env: str) -> str:
    """Run ``cmd``; fail the test with the output's tail if it fails. Returns stdout + stderr."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def stdout_of(cmd: Sequence[str], cwd: Path, timeout: float = 300) -> str:
    """Only the stdout of a command that must succeed (for JSON; progress bars go to stderr)."""
    proc = subprocess.run(list(cmd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout


def pipeline(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *overrides]


def seed_base_model(cwd: Path, smoke_base: Path, overrides: Sequence[str]) -> str:
    """Put the session's smoke checkpoint into ``cwd``'s stage cache under the key the app computes.

    Saves building the same random 2-layer model in every test (about 15 s each); the
    entry is exactly what ``base_model.run`` writes plus the cache manifest.
    """
    from pipeline.app import StageTable
    from pipeline.core.files import write_json
    from pipeline.params import compose
    from pipeline.tracking import stage_cache

    recipe = stage_cache.stage_keys(stage_cache.read_specs(REPO / "dvc.yaml"), compose(list(overrides)), REPO,
                                    ("base_model",))["base_model"]
    entry = stage_cache.entry(cwd / "outputs" / "cache", "base_model", recipe["key"])
    shutil.copytree(smoke_base, StageTable.read(REPO / "dvc.yaml").paths("base_model", {"base_model": entry}).out)
    write_json(entry / stage_cache.MANIFEST, recipe)
    return recipe["key"]


def copy_checkout(dst: Path) -> None:
    """The files git would commit (tracked + untracked, not ignored), minus DVC outputs."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("data/prepared", "data/rendered", "models/", "reports/")):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_args: Sequence[str], cwd: Path, log_path: Path, environ: dict[str, str],
                  timeout: float = 120) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port; yields its URL once /health answers.

    It runs in its own process group, which is stopped whole afterwards: the server's
    worker processes outlive a SIGTERM sent to the parent alone.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           *store_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(f"{url}/health", proc, log_path, timeout, "mlflow server")
            yield url
        finally:
            stop_group(proc)


def wait_until_up(url: str, proc: subprocess.Popen, log_path: Path, timeout: float, what: str,
                  poll: float = 0.5) -> None:
    """Return once ``url`` answers 200; fail with the end of ``log_path`` if ``proc`` exits or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up:\n{log_path.read_text()[-4000:]}")
        time.sleep(poll)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left (the server's job consumers linger)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group made by start_new_session: only the server's processes
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass

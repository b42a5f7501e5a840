"""Shared by the sweep tests: run the real CLIs in a scratch directory with this checkout's code."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

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
    from pipeline import stage_cache
    from pipeline.files import write_json
    from pipeline.params import compose

    recipe = stage_cache.stage_keys(stage_cache.read_specs(REPO / "dvc.yaml"), compose(list(overrides)), REPO,
                                    ("base_model",))["base_model"]
    entry = stage_cache.entry(cwd / "outputs" / "cache", "base_model", recipe["key"])
    shutil.copytree(smoke_base, entry / "out")
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

"""A DVC remote round trip: run the smoke pipeline, `dvc push` to a local-directory remote,
clone the git repo afresh, `dvc pull`, and find the model and metrics restored and nothing
left for `dvc repro` to run. An S3 or SSH remote differs only in the `dvc remote add` URL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sweep_helpers import copy_checkout
from test_pipeline_dvc import _sh


@pytest.mark.slow
def test_push_clone_pull_restores_outputs_and_repro_is_a_no_op(tmp_path: Path) -> None:
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    copy_checkout(repo)
    _sh(["git", "init", "-q"], repo)
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "init"], repo)
    dvc = [sys.executable, "-m", "dvc"]
    _sh([*dvc, "exp", "run", "-S", "+experiment=smoke"], repo)
    _sh([*dvc, "remote", "add", "-d", "local", str(remote)], repo)
    _sh([*dvc, "push"], repo)
    _sh(["git", "add", "-A"], repo)  # params.yaml, dvc.lock, .dvc/config: what a clone needs
    _sh(["git", "commit", "-qm", "smoke results"], repo)

    _sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models/finetuned").exists()
    _sh([*dvc, "pull"], clone)
    for path in ("models/finetuned/adapter/adapter_model.safetensors", "models/finetuned/summary.json",
                 "reports/eval/metrics.json", "models/base/model.safetensors"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert json.loads((clone / "reports/eval/metrics.json").read_text())["tuned"]

    status = _sh([*dvc, "status"], clone)
    assert "up to date" in status, status
    out = _sh([*dvc, "repro"], clone)
    assert "Running stage" not in out, out
    assert out.count("didn't change, skipping") >= 5, out

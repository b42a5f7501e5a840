"""The issue's check, for real: `dvc exp run -S +experiment=smoke -S align=dpo` in a temporary git repo
puts the aligned arm, its paired differences and the preference metric into `dvc metrics show`; the
Hydra app runs the same experiment in the same repo and writes the align stage's outputs byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sweep_helpers import copy_checkout
from test_pipeline_dvc import _env, _files, _sh

OVERRIDES = ["+experiment=smoke", "align=dpo", "eval.models=[base,tuned,aligned]", "encoder=none"]


@pytest.mark.slow
def test_dvc_exp_run_smoke_align_dpo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_checkout(repo)
    _sh(["git", "init", "-q"], repo)
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "init"], repo)
    _sh([sys.executable, "-m", "dvc", "exp", "run", *[a for o in OVERRIDES for a in ("-S", o)]], repo)
    proc = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=repo, env=_env(),
                          capture_output=True, text=True, check=True)
    data = _metrics_file(json.loads(proc.stdout), "reports/eval/headline.json")  # DVC's one eval metrics file
    assert data is not None, proc.stdout[:2000]
    assert {"aligned", "delta_aligned_vs_tuned", "delta_aligned_vs_base", "preference"} <= set(data)
    assert set(data["aligned"]) == {"topic", "qa", "past_tense", "summary", "overall"}
    assert set(data["preference"]) == {"tuned", "aligned", "delta_aligned_vs_tuned"}
    assert {"ci_low", "ci_high", "p"} <= set(data["preference"]["delta_aligned_vs_tuned"])
    assert {"ci_low", "ci_high", "p"} <= set(data["delta_aligned_vs_tuned"]["overall"])
    assert (repo / "models/aligned/adapter/adapter_model.safetensors").is_file()
    assert (repo / "reports/align/train_loss.csv").read_text().count("\n") == 1 + 4  # header + smoke's 4 steps
    lock = (repo / "dvc.lock").read_text()
    assert "align:" in lock and "models/aligned" in lock
    # The Hydra app: align is a job-folder stage (it starts from the job's own SFT model).
    _sh([sys.executable, "-m", "pipeline", *OVERRIDES, "hydra.run.dir=outputs/app"], repo)
    job = repo / "outputs" / "app"
    for out in ("models/aligned", "data/pairs", "reports/eval/metrics.json"):
        dvc_side, app_side = _files(repo / out), _files(job / out)
        assert dvc_side and dvc_side == app_side, out


def _metrics_file(shown: object, name: str) -> dict | None:
    """The metrics of file ``name`` wherever `dvc metrics show --json` nests them (its shape varies by version)."""
    if isinstance(shown, dict):
        if name in shown and isinstance(shown[name], dict):
            return shown[name].get("data", shown[name])
        values = shown.values()
    elif isinstance(shown, list):
        values = shown
    else:
        return None
    return next((found for v in values if (found := _metrics_file(v, name)) is not None), None)

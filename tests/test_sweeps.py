"""A real 2x2 grid (`python -m pipeline -m ...`, basic sweeper) on the smoke experiment, and everything
that reads it: the MLflow parent/children, the shared stage cache, `pipeline.compare --sweep`, the
notebook, and `mlflow server` (REST API; a headless-Chromium look at the UI is marked slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from sweep_helpers import REPO, env, pipeline, seed_base_model, sh, stdout_of
from sweep_helpers import mlflow_server as running_mlflow_server

SMOKE = ["+experiment=smoke"]
GRID = ["trainer.lr=1e-3,3e-3", "finetune.lora.r=4,8"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, smoke_base: Path) -> dict[str, Any]:
    """Run the grid in a scratch directory with the default store (./mlflow.db); about 70 s."""
    cwd = tmp_path_factory.mktemp("grid")
    seed_base_model(cwd, smoke_base, SMOKE)
    log = sh(pipeline("-m", *SMOKE, *GRID, f"hydra.sweep.dir={cwd / 'multirun'}"), cwd)
    parent = json.loads((cwd / "multirun" / "mlflow_sweep.json").read_text())
    return {"cwd": cwd, "log": log, "uri": f"sqlite:///{cwd / 'mlflow.db'}", **parent}


def test_grid_has_one_parent_and_four_children(grid: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(grid["uri"])
    assert (grid["cwd"] / "mlflow.db").is_file(), "jobs used the default store in the launch directory"
    parent = client.get_run(grid["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.id"] == grid["sweep_id"] and parent.data.tags["sweep.role"] == "parent"
    assert parent.data.params["sweep.override.trainer.lr"] == "1e-3,3e-3"
    assert parent.data.params["sweep.override.finetune.lora.r"] == "4,8"
    assert parent.data.params["sweep.sweeper"] == "BasicSweeper"
    assert parent.data.params["sweep.metric"] == "eval.tuned.overall.score"

    exp = client.get_experiment(parent.info.experiment_id)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == grid["run_id"]]
    assert len(runs) == 5 and len(children) == 4
    assert {(r.data.params["trainer.lr"], r.data.params["finetune.lora.r"]) for r in children} == {
        ("0.001", "4"), ("0.001", "8"), ("0.003", "4"), ("0.003", "8")}
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["sweep.id"] == grid["sweep_id"]
        assert "eval_tuned/overall/score" in r.data.metrics and "eval_base/topic/accuracy" in r.data.metrics
        assert "eval_encoder/topic/accuracy" in r.data.metrics  # the encoder arm, beside the LLM in every job
        job_dir = Path(r.data.tags["hydra.job_dir"])
        assert job_dir.parent == grid["cwd"] / "multirun" and job_dir.name == r.data.tags["sweep.job_num"]
        assert (job_dir / "reports/eval/metrics.json").is_file() and (job_dir / "models/finetuned/adapter").is_dir()
    values = [r.data.metrics["eval_tuned/overall/score"] for r in children]
    assert parent.data.metrics["best.eval.tuned.overall.score"] == max(values)
    best = client.get_run(parent.data.tags["best.run_id"])
    assert best.data.metrics["eval_tuned/overall/score"] == max(values)


def test_grid_built_shared_stages_once(grid: dict[str, Any]) -> None:
    from pipeline.tracking import stage_cache

    cache = grid["cwd"] / "outputs" / "cache"
    builds = [b["stage"] for b in stage_cache.builds(cache)]
    # base_model was seeded from the session's smoke checkpoint; prepare, render and the encoder arm
    # (whose key holds no trainer.lr or finetune.lora.r) ran once for 4 jobs.
    assert builds == ["prepare", "render", "train_encoder"]
    assert len(list((cache / "render").glob("*/key.json"))) == 1
    for stage in ("render", "train_encoder"):
        used = {json.loads(p.read_text())[stage] for p in (grid["cwd"] / "multirun").glob("*/stages.json")}
        assert len(used) == 1 and grid["log"].count(f"{stage}: reused") == 3


def test_compare_sweep_names_the_swept_params(grid: dict[str, Any], tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    report = json.loads(stdout_of([sys.executable, "-m", "pipeline.compare", "--sweep", grid["sweep_id"],
                                   "--tracking-uri", grid["uri"], "--format", "json", "--plot", str(plot)], grid["cwd"]))
    assert set(report["config"]) == {"trainer.lr", "finetune.lora.r"}
    assert sorted(report["config"]["trainer.lr"]) == ["0.001", "0.001", "0.003", "0.003"]
    assert report["swept"] == ["finetune.lora.r", "trainer.lr"] and report["metric"] == "eval.tuned.overall.score"
    assert len(report["runs"]) == 4 and report["hashes"] == {}, "same data and template in every job"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = sh([sys.executable, "-m", "pipeline.compare", "--sweep", grid["run_id"], "--tracking-uri", grid["uri"],
             "--plot", str(tmp_path / "again.png")], grid["cwd"])
    assert "| `trainer.lr` |" in md and "same data and template in every run" in md


def test_every_job_exports_and_promote_registers_the_best(grid: dict[str, Any], tmp_path: Path) -> None:
    """Each job of the sweep wrote its merged model in its own folder; `pipeline.promote --sweep`
    registers the best job's (by the sweep's metric) as the champion, tagged with the sweep."""
    from mlflow.tracking import MlflowClient

    exports = sorted((grid["cwd"] / "multirun").glob("*/models/export/model.safetensors"))
    assert len(exports) == 4
    params = tmp_path / "params.yaml"
    sh([sys.executable, "-m", "pipeline.params", *SMOKE, "--out", str(params)], grid["cwd"])
    sh([sys.executable, "-m", "pipeline.promote", "--params", str(params), "--sweep", grid["run_id"]], grid["cwd"])
    client = MlflowClient(grid["uri"])
    version = client.get_model_version_by_alias("instruction-tuning", "champion")
    assert version.run_id == client.get_run(grid["run_id"]).data.tags["best.run_id"]
    assert version.tags["sweep.id"] == grid["sweep_id"]


NOTEBOOK = REPO / "notebooks" / "compare_experiments.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_against_the_sweep(grid: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    for key, value in env(MLFLOW_TRACKING_URI=grid["uri"], SWEEP_ID=grid["sweep_id"]).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"sweep {grid['sweep_id']}: 4 runs" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # params, learning curves, per task


@pytest.fixture(scope="module")
def mlflow_server(grid: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free localhost port over the grid's store; stopped (its whole process group) after."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_mlflow_server(["--backend-store-uri", grid["uri"], "--default-artifact-root",
                                str(grid["cwd"] / "mlartifacts")], grid["cwd"], log, env(), timeout=90) as url:
        yield url


def _api(url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_mlflow_server_lists_parent_and_children(grid: dict[str, Any], mlflow_server: str) -> None:
    exp = _api(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=instruction-tuning")
    exp_id = exp["experiment"]["experiment_id"]
    runs = _api(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]

    def tags(run: dict[str, Any]) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parent = next(r for r in runs if r["info"]["run_id"] == grid["run_id"])
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == grid["run_id"]]
    assert len(children) == 4
    parent_params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert parent_params["sweep.override.trainer.lr"] == "1e-3,3e-3"
    assert "best.eval.tuned.overall.score" in {m["key"] for m in parent["data"]["metrics"]}
    for child in children:
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        metrics = {m["key"] for m in child["data"]["metrics"]}
        assert params["trainer.lr"] in ("0.001", "0.003") and params["finetune.lora.r"] in ("4", "8")
        assert {"train/loss", "val/loss", "eval_tuned/overall/score", "delta/tuned_vs_base/topic/accuracy"} <= metrics
        assert tags(child)["sweep.id"] == grid["sweep_id"]
    history = _api(mlflow_server, f"/api/2.0/mlflow/metrics/get-history?run_id={children[0]['info']['run_id']}"
                                  "&metric_key=train/loss")
    assert len(history["metrics"]) == 6


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                  "(apt-get install -y chromium)")
def test_mlflow_ui_lists_the_runs_in_headless_chromium(grid: dict[str, Any], mlflow_server: str,
                                                       tmp_path: Path) -> None:
    exp = _api(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=instruction-tuning")
    page = f"{mlflow_server}/#/experiments/{exp['experiment']['experiment_id']}/runs"  # the training-runs table
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1600,1000",
           f"--screenshot={tmp_path / 'ui.png'}", page]
    subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    dom = subprocess.run([c for c in cmd if not c.startswith("--screenshot")][:-1] + ["--dump-dom", page],
                         capture_output=True, text=True, timeout=180).stdout
    assert f"sweep {grid['sweep_id']}" in dom, "the parent run is listed"
    text = re.sub(r"<[^>]+>", "", dom)  # the count is `<strong>5</strong> matching runs`
    assert "5 matching runs" in text, "parent + 4 nested children"
    assert (tmp_path / "ui.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_job_closes_the_parent_as_failed(tmp_path: Path, smoke_base: Path) -> None:
    """Hydra ends a multirun at the first job that raises, without on_multirun_end: the exit
    hook still closes the parent run (FAILED, tagged), with the child that did finish."""
    from mlflow.tracking import MlflowClient

    seed_base_model(tmp_path, smoke_base, SMOKE)
    proc = subprocess.run(pipeline("-m", *SMOKE, "trainer.lr=1e-3,-1", f"hydra.sweep.dir={tmp_path / 'multirun'}"),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "trainer.lr: must be > 0" in out
    parent = json.loads((tmp_path / "multirun" / "mlflow_sweep.json").read_text())
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(parent["run_id"])
    assert run.info.status == "FAILED"
    assert "sweep.stopped_early" in run.data.tags
    assert run.data.metrics["sweep.runs"] == 1  # the lr=1e-3 job finished before the second one failed
    summary = json.loads((tmp_path / "multirun" / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["with_metric"] == 1

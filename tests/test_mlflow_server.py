"""The smoke experiment against a shared tracking server: `mlflow server` with a SQLite
backend and proxied artifacts (`--serve-artifacts`), reached over http://127.0.0.1 like a
team server; train and evaluate log into one run, read back through the client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from pipeline import evaluate, prepare, render, train
from pipeline.core.config import from_mapping
from pipeline.params import compose
from sweep_helpers import mlflow_server

EXPERIMENT = "shared-server-smoke"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    store = ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    with mlflow_server(store, root, root / "server.log", environ) as url:
        yield url


def test_train_and_evaluate_log_one_run_to_the_server(server: str, tmp_path: Path, smoke_base: Path) -> None:
    from mlflow.tracking import MlflowClient

    raw = compose(["+experiment=smoke", f"tracking.experiment={EXPERIMENT}"])
    cfg = from_mapping(raw)
    prepare.run(cfg, prepare.Paths(tmp_path / "prepared", tmp_path / "stats.json"))
    render.run(cfg, render.Paths(tmp_path / "prepared", smoke_base, tmp_path / "rendered", tmp_path / "render.json"))
    # The artifact root is ignored for http:// stores: the server decides where artifacts go.
    summary = train.run(cfg, train.Paths(tmp_path / "rendered", smoke_base, tmp_path / "tuned", tmp_path / "curves",
                                         tmp_path / "ckpt"), train.Tracking(server, tmp_path / "unused", tmp_path, "server-exp"))
    metrics = evaluate.run(cfg, evaluate.Paths(tmp_path / "rendered", tmp_path / "prepared", smoke_base, tmp_path / "eval",
                                              tmp_path / "tuned"),
                           evaluate.Tracking(server, tmp_path / "unused", tmp_path, "server-exp"))

    client = MlflowClient(server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied through the server
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_id == summary["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == str(cfg.trainer.max_steps)
    assert run.data.metrics["train/loss"] == pytest.approx(summary["train_loss"])
    assert run.data.metrics["eval_base/overall/score"] == metrics["base"]["overall"]["score"]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "config.yaml", "eval"} <= top
    # The adapter went to the server once, as the run's logged model.
    model = client.get_logged_model(run.data.tags["pipeline.model_id"])
    assert model.source_run_id == run.info.run_id
    assert "adapter_model.safetensors" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    # The artifacts really went through the server: download the config back and compare.
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "download"))
    assert yaml.safe_load(Path(local).read_text()) == {k: raw[k] for k in train.OWN_SECTIONS}
    assert not (tmp_path / "unused").exists()

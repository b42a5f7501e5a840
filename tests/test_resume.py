"""Resume after SIGKILL: a killed training run continues from its last checkpoint and ends
bit for bit where an uninterrupted run ends, in the same MLflow run; a SIGTERM writes a
checkpoint and marks the run KILLED.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import prepared_workdir
from pipeline.core.files import read_json
from pipeline.params import compose
from pipeline.tracking import stage_run

OVERRIDES = ["+experiment=smoke", "trainer.max_steps=40", "trainer.val_check_interval=5", "trainer.batch_size=2",
             "finetune.lora.dropout=0.1"]  # dropout makes the RNG state matter


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, smoke_base: Path) -> Path:
    root = prepared_workdir(tmp_path_factory.mktemp("resume"), compose(OVERRIDES), smoke_base)
    long = compose([*OVERRIDES, "trainer.max_steps=5000"])  # still training when SIGTERM arrives
    (root / "long.yaml").write_text(yaml.safe_dump(long, sort_keys=False))
    accumulating = compose([*OVERRIDES, "trainer.max_steps=5000", "trainer.micro_batches=3"])
    (root / "long3.yaml").write_text(yaml.safe_dump(accumulating, sort_keys=False))
    return root


def _train(root: Path, name: str, params: str = "params.yaml") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # The checkout under test, not whichever one the venv's editable install points to.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pipeline.train", "--params", params, "--rendered", "rendered",
           "--base-model", "base", "--out", f"{name}/model", "--curves", f"{name}/curves",
           "--checkpoints", f"{name}/ckpt"]
    log = open(root / f"{name}.log", "a")  # a file, not a pipe: a full pipe would block the progress bar
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(root: Path, name: str) -> str:
    return (root / f"{name}.log").read_text()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_sigkill_then_rerun_equals_uninterrupted(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    full = _train(workdir, "full")
    assert full.wait() == 0, _log(workdir, "full")

    killed = _train(workdir, "killed")
    _wait_for(workdir / "killed/ckpt/last.ckpt", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (workdir / "killed/model").exists(), "a killed stage must leave no output"
    import torch

    step = torch.load(workdir / "killed/ckpt/last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 40, f"the kill should land mid-training, not at step {step}"
    run_id = read_json(workdir / "killed/ckpt/resume.json")["run_id"]

    resumed = _train(workdir, "killed")
    assert resumed.wait() == 0, _log(workdir, "killed")
    assert "resuming MLflow run" in _log(workdir, "killed")

    a = load_file(workdir / "full/model/adapter/adapter_model.safetensors")
    b = load_file(workdir / "killed/model/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs after resume"
    assert (workdir / "full/curves/train_loss.csv").read_text() == (workdir / "killed/curves/train_loss.csv").read_text()

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags[stage_run.DIGEST_TAG] == stage_run.model_digest(workdir / "killed/model")
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert not (workdir / "killed/ckpt").exists(), "checkpoints are removed once training finished"


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_sigterm_checkpoints_and_marks_the_run_killed(workdir: Path, micro_batches: int) -> None:
    """With 3 micro-batches a step, the signal waits for the step's end: the checkpoint holds whole
    steps only (its batch count is 3 x its step count)."""
    import torch
    from mlflow.tracking import MlflowClient

    name = f"term{micro_batches}"
    proc = _train(workdir, name, params="long.yaml" if micro_batches == 1 else "long3.yaml")
    _wait_for(workdir / f"{name}/ckpt/resume.json", proc)
    _wait_for(workdir / f"{name}/ckpt/last.ckpt", proc)
    before = (workdir / f"{name}/ckpt/last.ckpt").stat().st_mtime_ns
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, _log(workdir, name)  # 128 + SIGTERM: never 0, so DVC stops
    state = read_json(workdir / f"{name}/ckpt/resume.json")
    assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(state["run_id"]).info.status == "KILLED"
    assert (workdir / f"{name}/ckpt/last.ckpt").stat().st_mtime_ns > before, "SIGTERM should write a fresh checkpoint"
    assert not (workdir / f"{name}/model").exists()
    assert state["plan"]["micro_batches"] == micro_batches
    ckpt = torch.load(workdir / f"{name}/ckpt/last.ckpt", weights_only=False, map_location="cpu")
    batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert batches == micro_batches * ckpt["global_step"], (batches, ckpt["global_step"])


@pytest.mark.slow  # a training subprocess and its MLflow store, end to end
def test_train_encoder_sigterm_exits_143_and_marks_its_run_killed(workdir: Path) -> None:
    """The encoder arm's stage stops like train: exit code 143 (not Lightning's 0) and its run KILLED."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pipeline.train_encoder", "--params", "long.yaml", "--prepared", "prepared",
           "--out", "enc-term/model", "--curves", "enc-term/curves"]
    with open(workdir / "enc-term.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while "trainable parameters" not in _log(workdir, "enc-term"):  # printed just before fit starts
            assert proc.poll() is None and time.monotonic() < deadline, _log(workdir, "enc-term")
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, _log(workdir, "enc-term")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instruction-tuning")
    [run] = client.search_runs([exp.experiment_id], "tags.arm = 'encoder'")
    assert run.info.status == "KILLED"
    assert not (workdir / "enc-term/model").exists()

"""Hydra's other sweepers and launchers on the real app: joblib (parallel jobs on one SQLite store),
Optuna (3 trials, best value on the parent), and submitit SLURM (composes; its settings reach sbatch)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from sweep_helpers import REPO, pipeline, seed_base_model, sh

from pipeline.tracking import runs as tracking
from pipeline.params import CONF_DIR, compose

SMOKE = ["+experiment=smoke"]


def _compose_hydra(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_launcher_and_sweeper_configs_stay_out_of_params() -> None:
    """Plugin settings live under hydra.*, which params.yaml (and DVC's composition) never sees."""
    plain = compose([])
    assert "hydra" not in plain
    for extra in (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/sweeper=optuna_eval"],
                  ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"]):
        assert compose(extra) == plain, extra
    assert "hydra" not in yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def test_optuna_sweeper_config_uses_the_callback_objective() -> None:
    from omegaconf import OmegaConf

    cfg = _compose_hydra(["hydra/sweeper=optuna_eval"])
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"].endswith("OptunaSweeper")
    assert sweeper["direction"] == cfg.hydra.callbacks.mlflow_sweep.direction == "maximize"
    assert sweeper["n_trials"] > 0 and set(sweeper["params"]) == {"trainer.lr", "finetune.lora.r"}


def test_submitit_slurm_settings_reach_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM is not here: build the launcher Hydra would build and the sbatch script it would submit."""
    # submitit refuses to build a SLURM executor unless `srun` is on PATH; nothing is ever submitted,
    # so an empty stand-in is enough (the one fake here, because there is no cluster).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = _compose_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=a100",
                          "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=90",
                          f"hydra.sweep.dir={tmp_path}", "hydra.job.name=pipeline"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (launcher.params["partition"], launcher.params["gpus_per_node"], launcher.params["timeout_min"]) == (
        "a100", 2, 90)
    # The same mapping SlurmLauncher.launch() applies before submitting (hydra-submitit-launcher 1.2.0).
    executor = submitit.AutoExecutor(cluster="slurm", folder=launcher.params["submitit_folder"],
                                     slurm_max_num_timeout=launcher.params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m pipeline", "uid")
    assert "#SBATCH --partition=a100" in script
    assert "#SBATCH --gpus-per-node=2" in script
    assert "#SBATCH --time=90" in script


def _hammer(uri: str, artifact_root: str, worker: int, errors: Any) -> None:
    """One process creating runs and logging into a shared SQLite store as fast as it can."""
    try:
        from mlflow.tracking import MlflowClient

        for i in range(4):
            run_id = tracking.start_run(uri, "concurrency", Path(artifact_root), {"worker": worker, "i": i,
                                                                                  "trainer": {"lr": 0.1 * i}},
                                        {"t": "x"}, run_name=f"w{worker}-{i}")
            client = MlflowClient(uri)
            for step in range(5):
                client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
            tracking.locked_write(uri, lambda: client.set_terminated(run_id, "FINISHED"))
    except BaseException as err:  # reported to the parent test, which fails with it
        errors.put(f"worker {worker}: {err!r}")


def test_parallel_processes_on_a_fresh_sqlite_store_lose_no_run(tmp_path: Path) -> None:
    """Four processes start at once on a store that does not exist yet (table creation races too)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(uri, str(tmp_path / "art"), w, errors)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not problems, problems
    assert all(p.exitcode == 0 for p in procs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrency").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{w}-{i}" for w in range(4) for i in range(4))
    assert all(r.info.status == "FINISHED" and len(client.get_metric_history(r.info.run_id, "loss")) == 5
               for r in runs)


@pytest.mark.slow
def test_joblib_two_parallel_jobs_lose_no_run(tmp_path: Path, smoke_base: Path) -> None:
    seed_base_model(tmp_path, smoke_base, SMOKE)
    log = sh(pipeline("-m", *SMOKE, "trainer.lr=1e-3,3e-3", "finetune.lora.r=4,8", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'multirun'}"), tmp_path)
    assert "database is locked" not in log.lower()
    assert "JoblibLauncher" in log or "Joblib.Parallel" in log
    parent = json.loads((tmp_path / "multirun" / "mlflow_sweep.json").read_text())
    children = tracking.child_runs(parent["uri"], parent["run_id"])
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent["uri"])
    for r in children:
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 6, "every step's metric arrived"
        assert "eval_tuned/overall/score" in r.data.metrics
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"
    # Both workers wanted the same render and encoder arm; the per-key lock let exactly one of them build each.
    from pipeline.tracking import stage_cache

    assert [b["stage"] for b in stage_cache.builds(tmp_path / "outputs" / "cache")] == [
        "prepare", "render", "train_encoder"]
    assert all("eval_encoder/topic/accuracy" in r.data.metrics for r in children)


@pytest.mark.slow
def test_optuna_three_trials_best_value_on_the_parent(tmp_path: Path, smoke_base: Path) -> None:
    # Perplexity varies between trials even on the random smoke model; accuracy would be 0 everywhere.
    metric = "eval.tuned.topic.perplexity"
    seed_base_model(tmp_path, smoke_base, SMOKE)
    sh(pipeline("-m", *SMOKE, "hydra/sweeper=optuna_eval", "hydra.sweeper.n_trials=3",
                f"hydra.callbacks.mlflow_sweep.metric={metric}", "hydra.callbacks.mlflow_sweep.direction=minimize",
                f"hydra.sweep.dir={tmp_path / 'multirun'}"), tmp_path)
    parent_info = json.loads((tmp_path / "multirun" / "mlflow_sweep.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent_info["uri"])
    parent = client.get_run(parent_info["run_id"])
    children = tracking.child_runs(parent_info["uri"], parent_info["run_id"])
    assert len(children) == 3
    values = [r.data.metrics["eval_tuned/topic/perplexity"] for r in children]
    assert parent.data.metrics[f"best.{metric}"] == min(values)
    assert parent.data.params["sweep.sweeper"] == "OptunaSweeper"
    assert parent.data.params["sweep.sweeper.direction"] == "minimize"
    assert parent.data.params["sweep.space.trainer.lr"].startswith("tag(log, interval(")
    optuna = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == pytest.approx(min(values))
    best = client.get_run(parent.data.tags["best.run_id"])
    assert float(best.data.params["trainer.lr"]) == pytest.approx(optuna["best_params"]["trainer.lr"])
    assert "sweep/optimization_results.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}


def test_sweep_callback_config_instantiates() -> None:
    from hydra.utils import instantiate

    from pipeline.tracking.sweeps import MlflowSweep, Objective

    cb = instantiate(_compose_hydra([]).hydra.callbacks.mlflow_sweep)
    assert isinstance(cb, MlflowSweep) and cb.objective == Objective("eval.tuned.overall.score", "maximize")
    assert cb.objective.best({"a": 0.2, "b": 0.5}) == ("b", 0.5)
    assert Objective("m", "minimize").best({"a": 0.2, "b": 0.5}) == ("a", 0.2)
    with pytest.raises(ValueError, match="direction"):
        Objective("m", "up")

"""Training past one process: the sampler shards every epoch exactly once over the ranks,
the strategy builder turns conf/trainer/*.yaml into Lightning strategies, and (slow) a real
two-process DDP run on CPU (gloo) ends where one process with the same global batch ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from pipeline import prepare, render
from pipeline.training import strategies
from pipeline.core.config import from_mapping
from pipeline.core.files import read_json
from pipeline.params import compose
from pipeline.training.module import EpochSampler
from pipeline.tracking import stage_run

REPO = Path(__file__).resolve().parents[1]


@given(n=st.integers(1, 60), batch=st.integers(1, 8), world=st.integers(1, 4), epoch=st.integers(0, 3))
def test_every_example_once_per_epoch_across_ranks(n: int, batch: int, world: int, epoch: int) -> None:
    if n < world:
        with pytest.raises(ValueError):
            EpochSampler([1] * n, batch, seed=0, world=world)
        return
    samplers = [EpochSampler([1] * n, batch, seed=0, rank=r, world=world) for r in range(world)]
    per_rank = []
    for s in samplers:
        s.set_epoch(epoch)
        per_rank.append(list(s))
    assert len({len(b) for b in per_rank}) == 1, "ranks must run the same number of steps"
    assert all(batch_ for batches in per_rank for batch_ in batches), "no rank may get an empty batch"
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(n))


def test_ranks_together_take_the_single_process_batches() -> None:
    # DDP with batch 2 on 2 ranks trains each step on the rows one process takes with batch 4.
    single = list(EpochSampler([1] * 22, 4, seed=3))
    ranks = [list(EpochSampler([1] * 22, 2, seed=3, rank=r, world=2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in single]


def test_skip_resumes_mid_epoch_on_every_rank() -> None:
    for rank in range(2):
        full = list(EpochSampler([1] * 30, 3, seed=1, rank=rank, world=2))
        resumed = EpochSampler([1] * 30, 3, seed=1, rank=rank, world=2)
        resumed.skip = 2
        assert list(resumed) == full[2:]


def test_strategies_build_from_every_trainer_config() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    built = {name: strategies.build(from_mapping(compose([f"trainer={name}"])).trainer.strategy)
             for name in ("cpu", "gpu", "ddp", "fsdp")}
    assert built["cpu"] == built["gpu"] == "auto"
    assert isinstance(built["ddp"], DDPStrategy)
    assert isinstance(built["fsdp"], FSDPStrategy)
    assert built["fsdp"].kwargs["use_orig_params"] is True
    policy = built["fsdp"].kwargs["auto_wrap_policy"]  # Lightning turns the set into a ModuleWrapPolicy
    assert LlamaDecoderLayer in policy._module_classes


def test_unknown_wrap_class_names_the_key() -> None:
    cfg = from_mapping(compose(["trainer=fsdp", "trainer.strategy.auto_wrap=[transformers.NoSuchLayer]"]))
    with pytest.raises(ValueError, match="trainer.strategy.auto_wrap.*NoSuchLayer"):
        strategies.build(cfg.trainer.strategy)


# --- the real thing: two gloo processes through `python -m pipeline.train` ---------------

SINGLE = ["+experiment=smoke", "trainer.batch_size=4"]
DDP = ["+experiment=smoke", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.batch_size=2"]
# Same rows per optimizer step (see test_ranks_together_take_the_single_process_batches).
# What differs: DDP averages the two ranks' per-token means, one process takes the mean over
# all tokens of the batch, so a step's gradient is weighted slightly differently whenever
# the two halves hold different numbers of completion tokens; plus float summation order.
# The last step's train loss is the mean of the two ranks' means, not the batch's token
# mean. Measured over the 6 smoke steps: train loss 0.24% apart, val loss (token-weighted
# over the whole split, summed over ranks) 0.03%. 2% leaves room for that and for other
# CPUs' float rounding, and still catches a DDP val loss reduced wrongly (3% off, seen
# while building this) or a rank training on rows it should not see.
REL_TOL = 0.02


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, smoke_base: Path) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    for name, overrides in (("single", SINGLE), ("ddp", DDP)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(compose(overrides), sort_keys=False))
    cfg = from_mapping(compose(SINGLE))
    prepare.run(cfg, prepare.Paths(root / "prepared", root / "stats.json"))
    render.run(cfg, render.Paths(root / "prepared", smoke_base, root / "rendered", root / "render.json"))
    (root / "base").symlink_to(smoke_base)
    return root


def _train(root: Path, name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)  # this checkout's pipeline, in every rank, whatever is pip-installed
    cmd = [sys.executable, "-m", "pipeline.train", "--params", f"{name}.yaml", "--rendered", "rendered",
           "--base-model", "base", "--out", f"{name}/model", "--curves", f"{name}/curves",
           "--checkpoints", f"{name}/ckpt"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(workdir: Path) -> None:
    _train(workdir, "single")
    log = _train(workdir, "ddp")
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log, log[-2000:]

    one, two = (read_json(workdir / n / "model/summary.json") for n in ("single", "ddp"))
    assert one["steps"] == two["steps"] == 6
    for key in ("train_loss", "val_loss"):
        assert two[key] == pytest.approx(one[key], rel=REL_TOL), key

    # Rank 0 alone tracked: one MLflow run in the store, finished, with the adapter.
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(from_mapping(compose(DDP)).tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="params.`trainer.strategy.name` = 'ddp'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[stage_run.DIGEST_TAG] == stage_run.model_digest(workdir / "ddp/model")
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"plots", "config.yaml"}
    assert client.get_logged_model(runs[0].data.tags["pipeline.model_id"]).source_run_id == runs[0].info.run_id
    assert (workdir / "ddp/model/adapter/adapter_model.safetensors").is_file()
    assert not (workdir / "ddp/ckpt").exists()  # finished: checkpoints removed

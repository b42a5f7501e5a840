"""Safe loading, shared outputs, diverging runs, imports named in config and locked MLflow writes
(RELIABILITY.md, issue 24)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, ModelConfig
from pipeline.core.errors import ModelError, PipelineError
from pipeline.core.files import atomic_dir, write_json


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_outputs_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    """A shared cache needs group-readable outputs: tempfile's private 0700/0600 must not survive the rename."""
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "inner").mkdir()
        write_json(tmp_path / "out" / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == 0o777 & ~umask == _mode(tmp_path / "out" / "inner")
    assert _mode(tmp_path / "out" / "a.json") == 0o666 & ~umask


# --- safetensors only -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bin_only(tmp_path_factory: pytest.TempPathFactory, smoke_base: Path) -> Path:
    """The smoke checkpoint with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("bin-only") / "model"
    shutil.copytree(smoke_base, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def _model_cfg(path: Path) -> ModelConfig:
    return ModelConfig(name="bin", path=str(path), gguf_file=None, revision=None, init="pretrained",
                       config_overrides={}, trust_remote_code=False, kind="causal_lm")


def test_materialize_refuses_pickle_only_weights(bin_only: Path, tmp_path: Path) -> None:
    from pipeline.core.models import materialize

    with pytest.raises(ModelError) as info:
        materialize(_model_cfg(bin_only), tmp_path / "out", seed=0)
    message = str(info.value)
    assert "\n" not in message and str(bin_only) in message and "pytorch_model.bin" in message
    assert "safetensors only" in message
    assert not (tmp_path / "out").exists()


def test_loading_a_checkpoint_refuses_pickle_only_weights(bin_only: Path) -> None:
    from pipeline.core.models import load_causal_lm

    with pytest.raises(ModelError, match="only pickle weights") as info:
        load_causal_lm(bin_only)
    assert str(bin_only) in str(info.value) and "\n" not in str(info.value)


def test_a_pickled_adapter_is_refused(smoke_base: Path, tmp_path: Path) -> None:
    """peft falls back to adapter_model.bin; load_finetuned does not."""
    import torch
    from safetensors.torch import load_file

    from pipeline.core.config import FinetuneConfig, LoraConfig
    from pipeline.core.models import apply_finetune, load_causal_lm, load_finetuned

    lora = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    model = apply_finetune(load_causal_lm(smoke_base), FinetuneConfig(method="lora", lora=lora))
    adapter = tmp_path / "tuned" / "adapter"
    model.save_pretrained(adapter)
    assert load_finetuned(smoke_base, tmp_path / "tuned") is not None  # safetensors: fine
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="adapter_model.bin") as info:
        load_finetuned(smoke_base, tmp_path / "tuned")
    assert str(adapter) in str(info.value)


def test_a_weights_file_named_in_config_must_be_safetensors(tmp_path: Path) -> None:
    from pipeline.core.models import require_safetensors

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"transformers_weights": "evil.bin"}))
    with pytest.raises(ModelError, match="evil.bin"):
        require_safetensors(tmp_path)


# --- a diverging run stops ------------------------------------------------------------------------


def test_a_non_finite_loss_stops_training_with_a_pipeline_error(tmp_path: Path) -> None:
    import lightning as L
    import torch

    from pipeline.training.module import NonFiniteLoss, StopOnNonFiniteLoss

    class Diverging(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return (self.w * batch).sum() * (float("nan") if batch_idx == 2 else 1.0)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.ones(10, 1), batch_size=1)
    trainer = L.Trainer(max_steps=10, callbacks=[StopOnNonFiniteLoss()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match="nan at optimizer step 3") as info:  # the third batch
        trainer.fit(Diverging(), data)
    assert isinstance(info.value, PipelineError) and "trainer.lr" in str(info.value)


# --- imports named by config ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["no.such.module.Layer", "torch.nn.NoSuchLayer", "builtins.dict", "os.sep"])
def test_auto_wrap_must_name_a_torch_module_class(path: str) -> None:
    from pipeline.training.strategies import layer_class

    with pytest.raises(ConfigError, match="trainer.strategy.auto_wrap"):
        layer_class(path)
    assert layer_class("torch.nn.Linear").__name__ == "Linear"


@pytest.mark.parametrize("spec", [{"_target_": "no.such.fn"}, {"_target_": "os.sep"},
                                  {"_target_": "builtins.dict", "x": 1}])
def test_the_safety_classifier_must_be_an_importable_callable(spec: dict) -> None:  # type: ignore[type-arg]
    from pipeline.data.safety import build_classifier

    with pytest.raises(ConfigError, match="safety.classifier") as info:
        build_classifier(spec)
    assert all("\n" not in p for p in info.value.problems)


# --- MLflow writes under the store's lock -----------------------------------------------------------


def test_reopening_and_ending_a_run_waits_for_the_store_lock(tmp_path: Path) -> None:
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = runs.start_run(uri, "e", tmp_path / "art", {}, {})
    holder = FileLock(str(tmp_path / "mlflow.db.lock"))
    held = threading.Event()

    def hold() -> None:
        with holder:
            held.set()
            time.sleep(1.0)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    started = time.monotonic()
    with runs.active_run(uri, run_id):
        waited = time.monotonic() - started
    thread.join()
    assert waited >= 0.8, waited
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"

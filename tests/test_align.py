"""The align stage end to end on the smoke model: align=none writes only markers (and evaluate has
no aligned arm), align=dpo trains from the SFT model, logs DPO metrics to MLflow, and evaluate
scores the aligned arm with its paired differences and the preference metric."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline import align, evaluate, train
from pipeline.core.config import from_mapping
from pipeline.core.files import read_json
from pipeline.params import compose
from pipeline.tracking.runs import Tracking


def _paths(data: Path, tuned: Path, out: Path) -> align.Paths:
    return align.Paths(data / "prepared", data / "rendered", data / "base", tuned, out / "aligned", out / "pairs",
                       out / "curves", out / "ckpt")


def test_align_none_writes_only_markers(tmp_path: Path, smoke_data: Path) -> None:
    cfg = from_mapping(compose(["+experiment=smoke"]))
    assert not cfg.align.enabled  # the default
    assert align.run(cfg, _paths(smoke_data, tmp_path / "no-sft-needed", tmp_path), None) == {
        "skipped": "align.enabled is false (align=none)"}
    for folder in ("aligned", "pairs"):
        assert [p.name for p in (tmp_path / folder).iterdir()] == ["skipped.json"]
    assert (tmp_path / "curves" / "train_loss.csv").read_text() == "step,loss\n"
    assert evaluate.has_aligned(evaluate.Paths(smoke_data / "rendered", smoke_data / "prepared", smoke_data / "base",
                                               tmp_path / "eval", aligned=tmp_path / "aligned")) is False


@pytest.mark.slow
def test_align_dpo_then_evaluate_the_aligned_arm(tmp_path: Path, smoke_data: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = from_mapping(compose(["+experiment=smoke", "align=dpo"]))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, models=["base", "tuned", "aligned"]))
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path)
    tuned = tmp_path / "tuned"
    train.run(cfg, train.Paths(smoke_data / "rendered", smoke_data / "base", tuned, tmp_path / "train_curves",
                               tmp_path / "ckpt"), tracking)
    summary = align.run(cfg, _paths(smoke_data, tuned, tmp_path), tracking)
    assert summary["steps"] == cfg.align.trainer.max_steps and summary["method"] == "dpo"
    assert {p.name for p in (tmp_path / "aligned").iterdir()} == {"adapter", "config.yaml", "template.json",
                                                                   "summary.json"}
    counts = read_json(tmp_path / "pairs" / "counts.json")
    assert counts["source"] == "embedded" and counts["train"] > 0 and counts["test"] > 0
    history = MlflowClient(tracking.uri).get_metric_history(summary["run_id"], "rewards/accuracy")
    assert len(history) == cfg.align.trainer.max_steps
    assert MlflowClient(tracking.uri).get_run(summary["run_id"]).info.status == "FINISHED"
    metrics = evaluate.run(cfg, evaluate.Paths(smoke_data / "rendered", smoke_data / "prepared", smoke_data / "base",
                                               tmp_path / "eval", tuned, aligned=tmp_path / "aligned",
                                               pairs=tmp_path / "pairs"), tracking)
    assert {"aligned", "delta_aligned_vs_tuned", "delta_aligned_vs_base", "preference"} <= set(metrics)
    assert set(metrics["aligned"]) == set(metrics["tuned"])
    assert set(metrics["preference"]) == {"tuned", "aligned", "delta_aligned_vs_tuned"}
    intervals = read_json(tmp_path / "eval" / "intervals.json")
    assert intervals["preference"]["aligned"]["accuracy"]["n"] == counts["test"]
    assert "p_value" in intervals["intervals"]["delta_aligned_vs_tuned"]["overall"]["score"]
    assert "## Preference" in (tmp_path / "eval" / "report.md").read_text()


def test_align_config_problems_are_reported_together() -> None:
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        from_mapping(compose(["align=dpo", "align.beta=0", "align.label_smoothing=0.5", "align.data.source=file",
                              "align.trainer.batching=packed", "align.trainer.devices=2"]))
    text = str(err.value)
    for key in ("align.beta", "align.label_smoothing", "align.data.path", "align.trainer.batching",
                "align.trainer.devices"):
        assert key in text, text
    # align=none validates nothing of the (inherited) dpo settings: they are not used.
    assert not from_mapping(compose(["align=none", "align.beta=0"])).align.enabled


def _untrained_sft(smoke_data: Path, cfg, out: Path) -> Path:
    """An SFT model folder in train's layout: a fresh LoRA adapter (the cost and shape of a trained one)."""
    from pipeline.core.files import write_json
    from pipeline.core.models import apply_finetune, load_causal_lm

    apply_finetune(load_causal_lm(smoke_data / "base"), cfg.finetune).save_pretrained(out / "adapter")
    write_json(out / "template.json", read_json(smoke_data / "rendered" / "template.json"))
    return out


def test_a_failed_align_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path: Path, smoke_data: Path,
                                                                       monkeypatch) -> None:
    """Crash after the step-2 checkpoint, run again: the same MLflow run goes on from step 2 and ends
    with the adapter an uninterrupted run writes."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from pipeline.training.dpo import PreferenceTuner

    cfg = from_mapping(compose(["+experiment=smoke", "align=dpo", "align.trainer.max_steps=4",
                                "align.trainer.val_check_interval=2"]))
    tuned = _untrained_sft(smoke_data, cfg, tmp_path / "tuned")
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path)
    whole = align.run(cfg, _paths(smoke_data, tuned, tmp_path / "whole"), tracking)
    step = PreferenceTuner.training_step

    def crash_at_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PreferenceTuner, "training_step", crash_at_3)
    paths = _paths(smoke_data, tuned, tmp_path / "cut")
    with pytest.raises(RuntimeError, match="simulated crash"):
        align.run(cfg, paths, tracking)
    state = read_json(paths.checkpoints / "resume.json")
    assert (paths.checkpoints / "last.ckpt").exists()
    client = MlflowClient(tracking.uri)
    assert client.get_run(state["run_id"]).info.status == "FAILED"
    monkeypatch.setattr(PreferenceTuner, "training_step", step)
    resumed = align.run(cfg, paths, tracking)
    assert resumed["run_id"] == state["run_id"] and resumed["steps"] == 4
    run = client.get_run(resumed["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert not paths.checkpoints.exists()
    a, b = (load_file(p / "aligned" / "adapter" / "adapter_model.safetensors") for p in (tmp_path / "whole",
                                                                                          tmp_path / "cut"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert whole["steps"] == 4

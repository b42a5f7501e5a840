"""What the two training stages (train, train_encoder) share: the Trainer, the summary and the save.

Both fit an :class:`~pipeline.training.module.InstructionTuner` with the same Trainer
settings, log to MLflow through Lightning's logger, write loss curves beside the model,
and save their result atomically. A summary holds only what the same config and data
reproduce (no timings, no run ids): the output folder is a DVC output, and anything that
differs between two identical runs would change its hash.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from pipeline.core.config import TrainerConfig
from pipeline.core.files import atomic_dir, write_json

if TYPE_CHECKING:
    import lightning as L

    from pipeline.training.module import LossCurve


def quiet_lightning() -> None:
    """Warnings that say nothing to a user of these stages."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Our sampler resumes mid-epoch itself (EpochSampler.skip), which Lightning cannot see.
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")


def build_trainer(t: TrainerConfig, curve: "LossCurve", root: Path, experiment: str, uri: str | None,
                  run_id: str | None, callbacks: Iterable[Any] = (), **settings: Any) -> "L.Trainer":
    """A Trainer with the shared settings, the loss curve, a stop at the first non-finite loss, a
    progress bar and, given a ``run_id``, Lightning's MLflow logger on that run (``uri`` None or no
    run: no logger)."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.training.module import StopOnNonFiniteLoss, trainer_settings

    from pipeline.tracking.views import step_metric_name

    class SectionedLogger(MLFlowLogger):
        """Lightning's ``train_loss`` as ``train/loss``: MLflow's chart view makes a section of each prefix."""

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            super().log_metrics({step_metric_name(k): v for k, v in metrics.items()}, step)

    logger = SectionedLogger(experiment_name=experiment, tracking_uri=uri, run_id=run_id) \
        if uri is not None and run_id is not None else False
    # tqdm, not rich: it still draws when DVC pipes the output to a non-terminal.
    return L.Trainer(**trainer_settings(t), logger=logger,
                     callbacks=[curve, StopOnNonFiniteLoss(), *callbacks, TQDMProgressBar(refresh_rate=1)],
                     default_root_dir=root, **settings)


def summary(trainer: "L.Trainer", curve: "LossCurve", **fields: Any) -> dict[str, Any]:
    """Steps and final losses, plus ``fields``: what ``summary.json`` holds."""
    return {**fields, "steps": trainer.global_step,
            "train_loss": curve.train[-1][1] if curve.train else None,
            "val_loss": curve.val[-1][1] if curve.val else None}


def save(out: Path, model: Any, weights: str, params: Mapping[str, Any], files: Mapping[str, Any],
         tokenizer: Any = None, state_dict: Mapping[str, Any] | None = None) -> None:
    """Write ``out`` atomically: the model's safetensors under ``weights/`` (with ``tokenizer``),
    ``config.yaml`` (``params``, secret-looking keys redacted) and each of ``files`` as JSON."""
    from pipeline.tracking.runs import redacted_yaml

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / weights, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / weights)
        # Secret-looking keys and values never reach disk or MLflow (the file is logged as an artifact).
        (tmp / "config.yaml").write_text(redacted_yaml(dict(params)))
        for name, value in files.items():
            write_json(tmp / name, value)


def log_outputs(client: Any, uri: str, run_id: str, out: Path, weights: str, curves: Path,
                names: Iterable[str], model_params: Mapping[str, Any] | None = None, model_type: str = "") -> str:
    """The saved files ``names`` and the curves as the run's artifacts, the folder's digest as its tag
    (how evaluate finds the run), and the weights folder as the run's MLflow LoggedModel (stored once:
    not also as a run artifact); under the store's write lock. Returns the model id."""
    from pipeline.tracking import stage_run, views
    from pipeline.tracking.runs import locked_write, params_for_logging

    def log() -> str:
        for name in names:
            client.log_artifact(run_id, str(out / name))
        client.log_artifacts(run_id, str(curves), artifact_path="plots")
        digest = stage_run.model_digest(out)
        client.set_tag(run_id, stage_run.DIGEST_TAG, digest)
        return views.log_model(client, run_id, out / weights, weights, params_for_logging(model_params or {}),
                               model_type, digest)

    return locked_write(uri, log)


def trainable(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fit_tuner(trainer: "L.Trainer", model: Any, t: TrainerConfig, loss: Callable[..., Any], data: Any,
              **fit_kwargs: Any) -> None:
    """``trainer.fit`` of the shared LightningModule."""
    from pipeline.training.module import InstructionTuner

    trainer.fit(InstructionTuner(model, t, loss), datamodule=data, **fit_kwargs)

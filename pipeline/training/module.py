"""Lightning pieces for fine-tuning: data module, a thin LightningModule, a loss-curve callback.

Building the model (and its LoRA wrapper) is :mod:`pipeline.core.models`' job; the module
here only runs steps, logs and configures the optimizer.
"""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.core.config import TrainerConfig
from pipeline.core.errors import PipelineError
from pipeline.core.files import read_jsonl
from pipeline.core.models import IGNORE_INDEX, completion_loss
from pipeline.training.packing import collate_packed, epoch_batches

if TYPE_CHECKING:
    from pipeline.training.plan import BatchPlan


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row (dynamic padding); padding carries no loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class EpochSampler(torch.utils.data.Sampler[list[int]]):
    """The batches of an epoch, depending only on (seed, epoch), able to start mid-epoch.

    ``mode`` is ``trainer.batching`` (see :func:`pipeline.training.packing.epoch_batches`). Lightning
    calls ``set_epoch`` before every epoch. After a resume, ``skip`` batches of the resumed
    epoch are left out once, so the run continues with exactly the batches an
    uninterrupted run would have seen next. Every mode has the same number of batches in every
    epoch, which is what makes "consumed batches" enough to resume from; with gradient
    accumulation (``multiple`` batches a step) that number is a whole number of steps, so a step
    never straddles two epochs.

    With ``world`` processes (DDP, dynamic batching) the epoch permutation is cut into
    global batches of ``batch_size * world`` rows and process ``rank`` takes every
    ``world``-th row of each, so every example is seen exactly once per epoch across ranks
    and a global step trains on the same rows as one process with ``batch_size * world``.
    A last global batch smaller than ``world`` joins the batch before it, so all ranks run
    the same number of steps (unequal step counts would hang DDP's all-reduce). It is a
    batch sampler so that Lightning's ``use_distributed_sampler`` (off in train.py) has
    nothing to re-wrap.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mode: str = "dynamic",
                 pack_length: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1, multiple: int = 1):
        if len(lengths) < world:
            raise ValueError(f"{len(lengths)} examples cannot be split over {world} processes")
        if world > 1 and mode != "dynamic":
            raise ValueError(f"trainer.batching={mode} runs in one process only; use dynamic with DDP")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.mode, self.pack_length, self.shuffle = mode, pack_length, shuffle
        self.rank, self.world, self.multiple = rank, world, multiple
        self.epoch, self.skip = 0, 0
        self.per_epoch = len(self._batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # The full epoch: Lightning counts the skipped batches as already done when it resumes.
        return self.per_epoch

    def _batches(self) -> list[list[int]]:
        if self.world == 1:
            return epoch_batches(self.mode, self.lengths, self.batch_size, self.pack_length, self.seed,
                                 self.epoch, self.shuffle, self.multiple)
        step = self.batch_size * self.world
        order = [i for b in epoch_batches("dynamic", self.lengths, step, 0, self.seed, self.epoch, self.shuffle)
                 for i in b]
        starts = list(range(0, len(order), step))
        if len(starts) > 1 and 0 < len(order) - starts[-1] < self.world:
            starts.pop()
        ends = [*starts[1:], len(order)]
        return [order[a:b][self.rank::self.world] for a, b in zip(starts, ends)]

    def __iter__(self):  # type: ignore[no-untyped-def]
        skip, self.skip = self.skip, 0
        return iter(self._batches()[skip:])


class RenderedData(L.LightningDataModule):
    """Train/val rows written by the render stage; the train order survives a resume."""

    def __init__(self, rendered: Path, batch_size: int, pad_id: int, seed: int, num_workers: int = 0,
                 collate_fn: Callable[[list[dict[str, Any]], int], dict[str, torch.Tensor]] = collate,
                 batching: str = "dynamic", pack_length: int = 0):
        super().__init__()
        self.rendered, self.batch_size, self.pad_id, self.collate_fn = rendered, batch_size, pad_id, collate_fn
        self.seed, self.num_workers = seed, num_workers
        self.batching, self.pack_length = batching, pack_length
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.resume_batches = 0  # batches already consumed by the run being resumed

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are written at optimizer-step boundaries, so the consumed batches
        # follow from the step count.
        return {"consumed_batches": self.trainer.global_step * self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_batches = state["consumed_batches"]

    def setup(self, stage: str | None = None) -> None:
        keep = ("input_ids", "labels")
        self.train_rows = [{k: r[k] for k in keep} for r in read_jsonl(self.rendered / "train.jsonl")]
        self.val_rows = [{k: r[k] for k in keep} for r in read_jsonl(self.rendered / "val.jsonl")]

    def _sampler(self, rows: list[dict[str, Any]], shuffle: bool, mode: str = "dynamic") -> EpochSampler:
        # Before fit there is no trainer (tests build loaders directly): one process.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        multiple = trainer.accumulate_grad_batches if trainer is not None and shuffle else 1
        return EpochSampler([len(r["input_ids"]) for r in rows], self.batch_size, self.seed, mode,
                            self.pack_length, shuffle, rank, world, multiple)

    def _loader(self, rows: list[dict[str, Any]], sampler: EpochSampler) -> DataLoader:
        # A private generator: creating an iterator would otherwise draw from the global RNG
        # (which drives dropout), and a resumed run creates iterators at different times.
        packed = sampler.mode == "packed"
        return DataLoader(rows, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_packed if packed else lambda b: self.collate_fn(b, self.pad_id),
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        sampler = self._sampler(self.train_rows, shuffle=True, mode=self.batching)
        sampler.set_epoch(self.resume_batches // len(sampler))
        sampler.skip = self.resume_batches % len(sampler)
        return self._loader(self.train_rows, sampler)

    def val_dataloader(self) -> DataLoader | list:
        # Validation keeps dynamic padding in file order: its loss must not depend on the batching.
        return self._loader(self.val_rows, self._sampler(self.val_rows, shuffle=False)) if self.val_rows else []


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Completion-only cross-entropy of a causal LM (per token with ``reduction="none"``); packed
    batches carry ``position_ids`` and no ``attention_mask``."""
    return completion_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                           reduction=reduction, position_ids=batch.get("position_ids"))


class InstructionTuner(L.LightningModule):
    """A loss (completion-only cross-entropy by default; the encoder passes its class
    cross-entropy), AdamW with linear warmup and cosine decay."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig,
                 loss: Callable[..., torch.Tensor] = token_loss):
        super().__init__()
        self.model, self.cfg, self.loss = model, cfg, loss
        self.model.train()  # from_pretrained returns eval mode, which would disable LoRA dropout
        self._step_start = time.perf_counter()

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        now = time.perf_counter()
        elapsed, self._step_start = now - self._step_start, now
        tokens = batch["attention_mask"].sum().item() if "attention_mask" in batch else batch["input_ids"].numel()
        # sync_dist: under DDP the curve shows the mean over ranks, not rank 0's shard alone.
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)
        self.log("tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Token- (or row-) weighted mean over the whole split, whatever the batch sizes and
        # ranks: sums and counts are added up here and over ranks at the end. (Lightning's own
        # sync_dist weighting reduces the token counts as integers and got DDP's mean wrong.)
        losses = self.loss(self.model, batch, reduction="none")
        self._val_sum += losses.double().sum()
        self._val_tokens += losses.numel()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        if tokens > 0:
            self.log("val_loss", (total / tokens).float(), prog_bar=True)

    def _frozen_keys(self) -> set[str]:
        """State-dict keys of the frozen weights; none under FSDP, whose strategy loads a
        checkpoint's full state dict itself, strictly, before the hooks below run."""
        if "FSDP" in type(self.trainer.strategy).__name__:
            return set()
        # remove_duplicate=False: a tied weight (SmolLM2's lm_head is its embedding) is under both names.
        return {f"model.{n}" for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave frozen weights out of checkpoints: a resumed LoRA run reloads them from the
        base model, as it did at the start. Saving them wrote the whole base model into each
        checkpoint (SmolLM2-135M: 0.54 GB more on disk, and ~0.6 GB more peak RSS while saving)."""
        frozen = self._frozen_keys()
        if frozen and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every trained weight must be in the checkpoint; only frozen ones may be missing."""
        frozen = self._frozen_keys()
        if not frozen:
            return
        saved = checkpoint["state_dict"]
        missing = [f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad
                   and f"model.{n}" not in saved]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained weight(s), e.g. {missing[:3]}")
        self.strict_loading = False  # frozen weights stay as loaded from the base model

    def configure_optimizers(self) -> Any:
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in self.model.parameters() if p.requires_grad]
        # The fused kernel updates each parameter in one pass (CPU and CUDA); the default on CPU
        # is a per-parameter loop of separate ops, each a pass over memory (docs/benchmarks.md).
        # Lightning refuses gradient clipping with a fused optimizer under mixed precision.
        fused = not str(self.cfg.precision).endswith("mixed") and all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=fused or None)
        warmup = int(self.cfg.warmup_ratio * self.cfg.max_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.cfg.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RngState(L.Callback):
    """Puts the RNG states (torch, numpy, python) in every checkpoint and restores them.

    Lightning restores model, optimizer, scheduler and loops but not the generators that
    drive dropout; without them a resumed run is close to, not equal to, an uninterrupted one.
    """

    # Stored as tensors, ints and tuples only, so checkpoints load with weights_only=True.
    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])
        torch.set_rng_state(state_dict["torch"])


class LossCurve(L.Callback):
    """Writes ``train_loss.csv`` and ``val_loss.csv`` (step, loss) for DVC plots."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def state_dict(self) -> dict[str, Any]:  # so a resumed run's curves start where they stopped
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [tuple(x) for x in state_dict["train"]]  # type: ignore[misc]
        self.val = [tuple(x) for x in state_dict["val"]]  # type: ignore[misc]

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Not on_validation_epoch_end: callbacks' epoch-end hooks run before the module's, which
        # logs val_loss, so they would see the previous validation's value (a step late).
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(loss)))

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train_loss.csv", self.train), ("val_loss.csv", self.val)):
            with open(self.out_dir / name, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["step", "loss"])
                writer.writerows(rows)


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (a scheduler's pre-emption notice) write ``last.ckpt`` before exiting.

    Lightning turns SIGTERM into an exception after the batch in progress. With gradient
    accumulation that batch may be mid-step, and a checkpoint there would lose the step's
    accumulated gradients; so the signal is held back until the step's last micro-batch
    (at most ``accumulate_grad_batches - 1`` more batches) and the checkpoint is written there.
    """

    def __init__(self, path: Path):
        self.path, self.held = path, False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        signals = trainer._signal_connector  # Lightning's flag, read after this hook
        mid_step = trainer.fit_loop.epoch_loop._should_accumulate()
        if signals.received_sigterm and mid_step:
            signals.received_sigterm, self.held = False, True
        elif self.held and not mid_step:
            signals.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # Mid-step only if the signal came after this batch's hook: no checkpoint rather than half a step.
        if isinstance(exception, SIGTERMException) and not trainer.fit_loop.epoch_loop._should_accumulate():
            trainer.save_checkpoint(self.path, weights_only=False)


class NonFiniteLoss(PipelineError, RuntimeError):
    """The training loss became NaN or infinite: the run diverged (learning rate, data, precision)."""


class StopOnNonFiniteLoss(L.Callback):
    """Stop training with :class:`NonFiniteLoss` at the first step whose loss is NaN or infinite.

    Lightning would otherwise train on to ``max_steps`` and exit 0 with NaN weights. The
    check reads the loss the step returned (one host sync per step, as the progress bar's).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            value = float(loss.detach().float().mean())
            raise NonFiniteLoss(f"training loss is {value} at optimizer step {trainer.global_step}; "
                                "lower trainer.lr or check the data and trainer.precision")


def trainer_settings(t: TrainerConfig) -> dict[str, Any]:
    """``L.Trainer`` keywords every stage takes from a :class:`TrainerConfig` the same way
    (budget, precision, devices and strategy, validation every ``val_check_interval`` optimizer steps)."""
    from pipeline.training import strategies

    return dict(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision,
        max_steps=t.max_steps, max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps, deterministic=True,
        strategy=strategies.build(t.strategy), use_distributed_sampler=False,  # EpochSampler shards itself
        enable_model_summary=False,
    )


def prepare_for_batching(model: torch.nn.Module, cfg: TrainerConfig, lengths: Sequence[int],
                         loss: Callable[..., torch.Tensor] = token_loss) -> "BatchPlan":
    """Resolve the batching plan for rows of ``lengths`` (packed attention installed when it packs),
    turn on activation checkpointing if the plan says so, compile the decoder if ``trainer.compile``.

    On a GPU with flash-attn installed, packed rows could use transformers'
    ``flash_attention_2`` varlen path instead (it reads the same ``position_ids``); on CPU
    per-document SDPA is the one correct path that does not build an L x L mask.
    """
    from pipeline.training import plan as batch_plan

    chosen = batch_plan.resolve(model, cfg, lengths, loss)
    batch_plan.apply_checkpointing(model, chosen.gradient_checkpointing)
    if cfg.compile:
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        core.model.compile()  # type: ignore[union-attr, operator]
    return chosen

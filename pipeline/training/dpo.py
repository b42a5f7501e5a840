"""DPO (Rafailov et al. 2023): the loss, per-sequence log-probs, pair batches, the LightningModule.

The policy starts as the SFT model and keeps training its weights (its LoRA adapter, or all
weights). The reference is the SFT model as it was before the first step, so its
log-probs of every pair are computed once, before training (:func:`reference_logps`), and
travel in the rows: no second model in memory and no reference forward pass per step
(docs/alignment.md has the timing against a live reference pass).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pipeline.core.files import read_jsonl
from pipeline.core.models import IGNORE_INDEX, completion_loss
from pipeline.training.module import InstructionTuner, RenderedData, collate

REF_KEYS = ("ref_chosen", "ref_rejected")


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)`` of both sides.

    With ``label_smoothing`` ls (conservative DPO): ``-(1-ls) logsigmoid(beta m) - ls logsigmoid(-beta m)``,
    ``m`` the policy's log-ratio margin minus the reference's.
    """
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed log-prob of its completion tokens (label positions), shape ``[rows]``."""
    nll = completion_loss(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], reduction="none")
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    rows = torch.repeat_interleave(torch.arange(len(counts), device=nll.device), counts)
    return -torch.zeros(len(counts), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


def pair_row(pair_id: str, chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    """One pair's tokens: the chosen and rejected rendered rows (same prompt, completion-only labels).
    ``input_ids`` is the longer side's, which is what the batch sampler sorts and budgets by."""
    longer = chosen if len(chosen["input_ids"]) >= len(rejected["input_ids"]) else rejected
    return {"id": pair_id, "input_ids": longer["input_ids"],
            "chosen_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
            "rejected_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}


def collate_pairs(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``2n`` padded sequences (the n chosen, then the n rejected: one forward pass) and the cached
    reference log-probs, when the rows have them."""
    sides = [{"input_ids": r[f"{s}_ids"], "labels": r[f"{s}_labels"]} for s in ("chosen", "rejected") for r in rows]
    batch = collate(sides, pad_id)
    for key in REF_KEYS:
        if key in rows[0]:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    return batch


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs of a :func:`collate_pairs` batch."""
    logps = sequence_logps(model, batch)
    n = len(logps) // 2
    return logps[:n], logps[n:]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> None:
    """Add ``ref_chosen``/``ref_rejected`` to every row: the model's log-probs now, in eval mode."""
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        chosen, rejected = pair_logps(model, collate_pairs(chunk, pad_id))
        for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            row["ref_chosen"], row["ref_rejected"] = c, r
    model.train(was_training)


def preference_accuracy(model: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int,
                        batch_size: int) -> list[float]:
    """Per pair, 1.0 when the model's log-prob of chosen exceeds that of rejected (else 0.0)."""
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chosen, rejected = pair_logps(model, collate_pairs(rows[start:start + batch_size], pad_id))
            out += (chosen > rejected).double().tolist()
    return out


class PairData(RenderedData):
    """Pair rows (:func:`pair_row` with reference log-probs) from ``train.jsonl``/``val.jsonl``, in the
    same resumable epoch order as instruction rows."""

    def setup(self, stage: str | None = None) -> None:
        self.train_rows = list(read_jsonl(Path(self.rendered) / "train.jsonl"))
        self.val_rows = list(read_jsonl(Path(self.rendered) / "val.jsonl"))


class PreferenceTuner(InstructionTuner):
    """:class:`InstructionTuner` (optimizer, schedule, checkpoint hooks, validation) with the DPO loss,
    logging each step's loss, reward accuracy and margin, and the chosen/rejected log-probs."""

    def __init__(self, model: torch.nn.Module, cfg: Any, beta: float, label_smoothing: float):
        self.beta, self.label_smoothing = beta, label_smoothing
        super().__init__(model, cfg, self._pair_loss)

    def _terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        chosen, rejected = pair_logps(model, batch)
        ref_c, ref_r = (batch[k].to(chosen.dtype) for k in REF_KEYS)
        return (*dpo_loss(chosen, rejected, ref_c, ref_r, self.beta, self.label_smoothing), chosen, rejected)

    def _pair_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   reduction: str = "mean") -> torch.Tensor:
        losses = self._terms(model, batch)[0]
        return losses if reduction == "none" else losses.mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, reward_c, reward_r, chosen, rejected = self._terms(self.model, batch)
        loss, n = losses.mean(), len(losses)
        now = time.perf_counter()
        elapsed, self._step_start = now - self._step_start, now
        logged = {"train_loss": loss, "rewards/accuracy": (reward_c > reward_r).float().mean(),
                  "rewards/margin": (reward_c - reward_r).mean(), "rewards/chosen": reward_c.mean(),
                  "rewards/rejected": reward_r.mean(), "logps/chosen": chosen.detach().mean(),
                  "logps/rejected": rejected.detach().mean()}
        for name, value in logged.items():
            self.log(name, value, prog_bar=name in ("train_loss", "rewards/accuracy"), batch_size=n, sync_dist=True)
        self.log("tokens_per_s", batch["attention_mask"].sum().item() / max(elapsed, 1e-9))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss


def sorted_targets(model: Any, source: str) -> None:
    """What peft writes into ``adapter_config.json`` made the same for the same config: the base named by
    its source and the target modules sorted (peft keeps a set, whose order follows the hash seed)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.name_or_path = core.config.name_or_path = source
    for adapter in getattr(model, "peft_config", {}).values():
        adapter.base_model_name_or_path = source
        if isinstance(adapter.target_modules, (set, frozenset)):
            adapter.target_modules = sorted(adapter.target_modules)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None

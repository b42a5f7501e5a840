"""The batching plan of a training run: ``auto`` settings resolved against the model and the rows.

``trainer.batching=auto`` packs rows wherever a probe finds packing exact for this model (the
packed forward of two documents equals their separate forwards) and the run has one process;
otherwise rows are padded per batch. ``trainer.pack_length=auto`` gives an optimizer step as many
tokens as a batch of ``batch_size`` average rows. Memory follows the tokens of one forward pass,
so ``trainer.micro_batches=auto`` splits a step into as few passes (gradients accumulated) as
keep one pass's saved activations, measured per token on the model itself, within
``trainer.activation_budget_mb``: on CPU this was measured as fast as one pass, where
recomputation costs about a third more compute. ``trainer.gradient_checkpointing=auto``
recomputes activations in the backward pass only if a pass still exceeds the budget.

The plan never changes what is learned (packing is exact, recomputation gives the same
values), only speed and memory, so it may depend on the model and the rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch

from pipeline.core.config import TrainerConfig
from pipeline.core.models import IGNORE_INDEX

PROBE_LENGTHS = (5, 7)  # two short documents: enough to see one attend to the other
PROBE_TOLERANCE = 1e-4  # max |packed - separate| logit difference, relative to the logits' scale (fp32)
ACTIVATION_PROBE_TOKENS = 64
MIN_MICRO_TOKENS = 256  # a packed micro-batch no shorter than this (CPU GEMMs stay efficient above it)


@dataclass(frozen=True)
class BatchPlan:
    batching: str  # dynamic | length_grouped | packed
    pack_length: int  # tokens per packed row, one row a micro-batch (0 unless packed)
    batch_size: int  # rows per micro-batch (dynamic, length_grouped)
    micro_batches: int  # forward passes per optimizer step, gradients accumulated
    micro_batch_tokens: int  # the largest: a packed row, or rows x the longest row
    activation_mb: float  # its saved activations without checkpointing, measured per token
    gradient_checkpointing: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        """What ``summary.json`` records: not the activation estimate, which is a measurement of this
        process (a DVC output must hold only what the config and data reproduce)."""
        return {k: v for k, v in asdict(self).items() if k != "activation_mb"}

    def trainer(self, t: TrainerConfig) -> TrainerConfig:
        """``t`` as the Trainer runs it: rows per micro-batch, micro-batches accumulated."""
        return replace(t, batch_size=self.batch_size, batching=self.batching, pack_length=self.pack_length or t.pack_length,
                       accumulate_grad_batches=t.accumulate_grad_batches * self.micro_batches)


def one_process(t: TrainerConfig) -> bool:
    return t.devices == 1 and t.strategy.name == "auto"


def _core(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packing_exact(model: torch.nn.Module) -> bool:
    """Whether the packed forward of two documents (positions restarting, no mask) equals their
    separate forwards, as the packed rows will be run (packed attention already installed)."""
    vocab = _core(model).get_input_embeddings().weight.shape[0]
    ids = (torch.arange(sum(PROBE_LENGTHS)) * 7 + 11) % vocab
    positions = torch.cat([torch.arange(n) for n in PROBE_LENGTHS])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids[None].to(device), position_ids=positions[None].to(device)).logits[0]
            separate = torch.cat([model(input_ids=part[None].to(device)).logits[0]
                                  for part in ids.split(list(PROBE_LENGTHS))])
    except (RuntimeError, TypeError, ValueError):  # a model that cannot take position_ids this way
        return False
    finally:
        model.train(was_training)
    scale = max(1.0, float(separate.abs().max()))
    return bool((packed - separate).abs().max() <= PROBE_TOLERANCE * scale)


def activation_bytes_per_token(model: torch.nn.Module, loss: Any, tokens: int = ACTIVATION_PROBE_TOKENS) -> float:
    """Bytes autograd keeps for the backward pass per token of one sequence of ``tokens``, counted
    with saved-tensor hooks on a forward of ``loss`` (each storage once); no backward runs."""
    vocab = _core(model).get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = ((torch.arange(tokens) * 13 + 5) % vocab)[None].to(device)
    labels = ids.clone()
    labels[:, : tokens * 3 // 4] = IGNORE_INDEX  # a quarter of the positions bear loss (their logits are kept)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(model, batch)
    finally:
        model.train(was_training)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights) / tokens


def pack_length(setting: Any, batch_size: int, lengths: Sequence[int], micro_batches: int = 1) -> int:
    """``setting`` tokens, or (auto) ``batch_size`` x the mean row length over ``micro_batches``
    rows, at least the longest row."""
    if setting != "auto":
        return int(setting)
    return max(max(lengths), round(batch_size * sum(lengths) / len(lengths) / micro_batches))


def _batching(model: torch.nn.Module, t: TrainerConfig) -> tuple[str, str]:
    """The batching mode and why; installs packed attention when it packs."""
    from pipeline.training.packing import restore_attention, use_packed_attention

    if t.batching not in ("packed", "auto"):
        return t.batching, f"trainer.batching={t.batching}"
    previous = use_packed_attention(model)
    if t.batching == "packed":
        return "packed", "trainer.batching=packed"
    if not one_process(t):
        batching, why = "dynamic", "auto: several processes (packing runs in one)"
    elif not packing_exact(model):
        batching, why = "dynamic", "auto: the packing probe found document boundaries not honoured"
    else:
        return "packed", "auto: the packing probe found packing exact"
    restore_attention(model, previous)
    return batching, why


def _shape(batching: str, t: TrainerConfig, lengths: Sequence[int], k: int) -> tuple[int, int, int]:
    """(pack length, rows per micro-batch, tokens of the largest micro-batch) with ``k`` micro-batches."""
    if batching == "packed":
        length = pack_length(t.pack_length, t.batch_size, lengths, k)
        return length, t.batch_size, max(length, max(lengths))
    rows = -(-t.batch_size // k)
    return 0, rows, rows * max(lengths)


def _micro_batches(batching: str, t: TrainerConfig, lengths: Sequence[int], per_token: float) -> int:
    """``trainer.micro_batches``, or (auto) the fewest that bring a pass within the budget, while a
    split still shrinks the pass. Padded batches split only into divisors of ``batch_size`` (a step
    keeps its rows); a packed pass keeps MIN_MICRO_TOKENS (shorter ones waste the CPU's GEMMs)."""
    if t.micro_batches != "auto":
        return int(t.micro_batches)
    if batching == "packed" and t.pack_length != "auto":
        return 1  # the user chose the row length
    candidates = range(1, 1 + (max(1, sum(lengths) // MIN_MICRO_TOKENS) if batching == "packed" else t.batch_size))
    if batching != "packed":
        candidates = [k for k in candidates if t.batch_size % k == 0]
    chosen = 1
    for k in candidates:
        tokens = _shape(batching, t, lengths, k)[2]
        if batching == "packed" and k > 1 and tokens < MIN_MICRO_TOKENS:
            break
        if tokens >= _shape(batching, t, lengths, chosen)[2] and k > 1:
            break  # no smaller pass to gain
        chosen = k
        if per_token * tokens / 2**20 <= t.activation_budget_mb:
            break
    return chosen


def resolve(model: torch.nn.Module, t: TrainerConfig, lengths: Sequence[int], loss: Any) -> BatchPlan:
    """The plan for ``model`` on rows of ``lengths``; installs packed attention when it packs."""
    batching, why = _batching(model, t)
    per_token = activation_bytes_per_token(model, loss)
    k = _micro_batches(batching, t, lengths, per_token)
    length, rows, tokens = _shape(batching, t, lengths, k)
    mb = per_token * tokens / 2**20
    checkpointing = bool(t.gradient_checkpointing) if t.gradient_checkpointing != "auto" else \
        mb > t.activation_budget_mb
    return BatchPlan(batching, length if batching == "packed" else 0, rows, k, tokens, round(mb, 1), checkpointing,
                     why)


def apply_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """transformers' per-layer activation checkpointing (non-reentrant: frozen inputs are fine)."""
    if on:
        _core(model).activation_checkpointing_enable({"use_reentrant": False})

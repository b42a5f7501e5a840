"""Batching plans (dynamic, length-grouped, packed) and attention for packed rows.

A plan is the list of batches (lists of row indices) of one epoch; it depends only on the
row lengths, the seed and the epoch, so a resumed run can skip to any batch. Packed rows
concatenate whole documents; ``position_ids`` restart at 0 for each, and the attention
below never lets one document see another.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import torch

from pipeline.models import IGNORE_INDEX

BATCHING_MODES = ("dynamic", "length_grouped", "packed")
PACKED_ATTENTION = "sdpa_packed"  # name registered with transformers' AttentionInterface


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most ``capacity``, longest rows first.

    Each row goes to the fullest bin it still fits in (a sorted list of free space makes
    that a bisect), so bins end up nearly full and few. A row longer than ``capacity``
    gets a bin of its own rather than being dropped or cut.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (max(capacity - n, 0), len(bins) - 1))
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return bins


def epoch_batches(mode: str, lengths: Sequence[int], batch_size: int, pack_length: int, seed: int, epoch: int,
                  shuffle: bool = True) -> list[list[int]]:
    """The batches of one epoch; every row appears in exactly one batch."""
    g = torch.Generator().manual_seed(seed + epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if mode == "dynamic":
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if mode == "length_grouped":
        # Stable sort of a shuffled order: equal lengths still vary between epochs.
        by_length = sorted(order, key=lambda i: lengths[i])
        batches = [by_length[i:i + batch_size] for i in range(0, n, batch_size)]
    elif mode == "packed":
        batches = best_fit_decreasing(lengths, pack_length)
    else:
        raise ValueError(f"trainer.batching={mode!r}: expected one of {BATCHING_MODES}")
    if shuffle:  # shuffled at the batch level with the same seeded generator
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def collate_packed(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One row holding every document of ``rows`` back to back, positions restarting per document.

    No ``attention_mask``: an all-ones mask would make transformers treat the row as one
    long document. Document boundaries are carried by ``position_ids`` alone.
    """
    ids = [t for r in rows for t in r["input_ids"]]
    labels: list[int] = []
    for r in rows:
        # The first token of a document is never the target of the previous document's last one.
        labels += [IGNORE_INDEX] + list(r["labels"][1:])
    positions = [p for r in rows for p in range(len(r["input_ids"]))]
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of a single packed row, from where its positions restart."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return [b - a for a, b in zip(starts, starts[1:])]


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal SDPA per document of a packed row; plain SDPA for anything else.

    On CPU one ``is_causal`` call per document was measured cheaper than one call with a
    block-diagonal mask (the mask forces the unfused math path over the whole row).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    # transformers has already built a block mask from the same positions; it is not needed here.
    packed = (position_ids is not None and position_ids.shape[0] == 1 == query.shape[0]
              and bool((position_ids[0, 1:] == 0).any()))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    outs = []
    start = 0
    for n in document_lengths(position_ids):
        q = query[:, :, start:start + n]
        k = key[:, :, start:start + n].repeat_interleave(groups, dim=1)
        v = value[:, :, start:start + n].repeat_interleave(groups, dim=1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout if module.training else 0.0, scale=scaling, is_causal=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` (a transformers model, possibly under peft) to :func:`packed_sdpa`.

    Masks are built exactly as for ``sdpa`` (padded batches need them).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.config._attn_implementation = PACKED_ATTENTION  # type: ignore[union-attr]

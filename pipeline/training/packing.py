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

from pipeline.core.models import IGNORE_INDEX

BATCHING_MODES = ("dynamic", "length_grouped", "packed")  # what trainer.batching=auto resolves to: plan.py
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


def to_multiple(batches: list[list[int]], multiple: int) -> list[list[int]]:
    """``batches`` split until their count is a multiple of ``multiple`` (where rows allow): the
    batch with the most rows (the first of equals) is halved each time, every row kept once.

    With gradient accumulation over ``multiple`` batches, an epoch whose batch count is not a
    multiple would end in a partial step, and a step would straddle two epochs; the optimizer
    steps, validations and checkpoints would then drift off the step boundaries.
    """
    batches = [list(b) for b in batches]
    while len(batches) % multiple:
        widest = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
        if len(batches[widest]) < 2:
            break  # fewer rows than micro-batches: nothing left to split
        rows = batches.pop(widest)
        half = (len(rows) + 1) // 2
        batches[widest:widest] = [rows[:half], rows[half:]]
    return batches


def epoch_batches(mode: str, lengths: Sequence[int], batch_size: int, pack_length: int, seed: int, epoch: int,
                  shuffle: bool = True, multiple: int = 1) -> list[list[int]]:
    """The batches of one epoch; every row appears in exactly one batch, and their count is a
    multiple of ``multiple`` (the micro-batches of an optimizer step; see :func:`to_multiple`)."""
    g = torch.Generator().manual_seed(seed + epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    if mode == "dynamic":
        return to_multiple([order[i:i + batch_size] for i in range(0, n, batch_size)], multiple)
    if mode == "length_grouped":
        # Stable sort of a shuffled order: equal lengths still vary between epochs.
        by_length = sorted(order, key=lambda i: lengths[i])
        batches = [by_length[i:i + batch_size] for i in range(0, n, batch_size)]
    elif mode == "packed":
        batches = best_fit_decreasing(lengths, pack_length)
    else:
        raise ValueError(f"trainer.batching={mode!r}: expected one of {BATCHING_MODES}")
    batches = to_multiple(batches, multiple)
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
    """Lengths of the documents of a single packed row: a document starts at the row's start and
    wherever the positions restart at 0."""
    starts = [0, *(position_ids[0, 1:] == 0).nonzero().flatten().add(1).tolist(), position_ids.shape[1]]
    return [b - a for a, b in zip(starts, starts[1:])]


class _Documents:
    """The documents of the packed row now in the forward pass, found once, not once per layer.

    Every layer receives the same ``position_ids`` tensor; reading its restarts costs a host
    sync on a GPU, so the answer is kept for that tensor (and its in-place version counter).
    """

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, int] | None = None
        self.lengths: list[int] | None = None
        self.cu_seqlens: torch.Tensor | None = None

    def of(self, position_ids: torch.Tensor | None) -> list[int] | None:
        """Document lengths when ``position_ids`` is one row whose positions restart, else None."""
        if position_ids is None or position_ids.shape[0] != 1:
            return None
        key = (position_ids, position_ids._version)
        if self.key is None or self.key[0] is not key[0] or self.key[1] != key[1]:
            lengths = document_lengths(position_ids)
            self.key, self.cu_seqlens = key, None
            self.lengths = lengths if len(lengths) > 1 else None
        return self.lengths

    def cumulative(self, device: torch.device) -> torch.Tensor:
        """[0, len_1, len_1 + len_2, ...] as int32 on ``device`` (what varlen kernels take)."""
        assert self.lengths is not None
        if self.cu_seqlens is None or self.cu_seqlens.device != device:
            ends = torch.tensor([0, *self.lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.cu_seqlens = ends.to(device)
        return self.cu_seqlens


_documents = _Documents()


_VARLEN = {"ok": True}  # set False, with a warning, if the kernel refuses this GPU


def _varlen_dtype(query: torch.Tensor, dropout: float) -> torch.dtype | None:
    """The half dtype for PyTorch's flash varlen kernel on this call, or None where it cannot run.

    It runs on CUDA in fp16/bf16 without dropout. Under autocast the rotary embedding leaves
    query and key in fp32, so the autocast dtype decides, as it does for SDPA.
    """
    if not query.is_cuda or dropout > 0 or not _VARLEN["ok"]:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int], dtype: torch.dtype,
            scaling: float | None) -> torch.Tensor | None:
    """The documents of ``lengths`` in one flash varlen call (``torch.nn.attention.varlen``, imported on
    first use: only CUDA runs need it); None if unavailable."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        _VARLEN["ok"] = False
        return None
    cu = _documents.cumulative(query.device)
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # [T, heads, dim]
    try:
        out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), scale=scaling, window_size=(-1, 0),
                          enable_gqa=True)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a GPU older than flash attention supports
        import warnings

        warnings.warn(f"flash varlen attention unavailable ({err}); packed rows use one SDPA call per document")
        _VARLEN["ok"] = False
        return None
    return out.unsqueeze(0)  # [1, T, heads, dim]


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each document of a packed row; plain SDPA for anything else.

    On CUDA in fp16/bf16: one flash varlen call for the whole row. Elsewhere: one
    ``is_causal`` SDPA call per document, key/value heads shared through ``enable_gqa``
    (no copies). On CPU per-document calls were measured cheaper than one call with a
    block-diagonal mask (the mask forces the unfused math path over the whole row) and
    than one call over the documents padded to the longest.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # transformers has already built a block mask from the same positions; it is not needed here.
    position_ids = kwargs.get("position_ids")
    lengths = _documents.of(position_ids) if query.shape[0] == 1 else None
    if lengths is None or not query.shape[2] == key.shape[2] == position_ids.shape[1]:  # (no KV cache)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dropout = dropout if module.training else 0.0
    dtype = _varlen_dtype(query, dropout)
    if dtype is not None and (out := _varlen(query, key, value, lengths, dtype, scaling)) is not None:
        return out, None
    # split, not slices: its backward is one cat of the documents' gradients, where each
    # slice's backward would zero-fill a gradient the size of the whole row.
    outs = [torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                             is_causal=True, enable_gqa=True)
            for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model: torch.nn.Module) -> str:
    """Switch ``model`` (a transformers model, possibly under peft) to :func:`packed_sdpa`; return the
    attention implementation it had (for :func:`restore_attention`).

    Masks are built exactly as for ``sdpa`` (padded batches need them).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous: str = core.config._attn_implementation  # type: ignore[union-attr, assignment]
    core.config._attn_implementation = PACKED_ATTENTION  # type: ignore[union-attr]
    return previous


def restore_attention(model: torch.nn.Module, previous: str) -> None:
    """Undo :func:`use_packed_attention`."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    core.config._attn_implementation = previous  # type: ignore[union-attr]

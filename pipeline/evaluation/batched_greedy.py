"""Batched greedy decoding with a shared-prefix KV cache: the fast path of generation.

One decode group (:func:`greedy_group`) is prefilled in chunks of prompts that share a token
prefix, each prefix run once at batch 1 and its KV cache repeated across the chunk; the
chunks' caches are left-padded to one width and stacked, and one forward per step serves
the whole group, rows leaving it at their own EOS, budget or stop string. The plain
definition it must equal is per-example ``model.generate``
(:func:`pipeline.evaluation.generation.one_by_one_ids`); ``tests/test_generation.py``
compares the two.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``prompts`` share, leaving each at least one token to run."""
    limit = min(map(len, prompts)) - 1
    for j in range(max(limit, 0)):
        if any(p[j] != prompts[0][j] for p in prompts):
            return j
    return max(limit, 0)


def _prefill_chunks(prompts: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Indices of ``prompts`` in prefill chunks of at most ``size``, grouped by shared prefix.

    Prompts sorted by their tokens sit next to those sharing the longest prefix with them
    (the same instruction wording). A prompt joins the open chunk when that computes fewer
    tokens (shared prefix once, then every row padded to the longest) than running it
    alone would; otherwise it opens a new chunk.
    """
    def cost(chunk: list[int]) -> int:
        rows = [prompts[i] for i in chunk]
        shared = _shared_prefix(rows)
        return shared + len(rows) * (max(map(len, rows)) - shared)

    chunks: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: list(prompts[i])):
        if chunks and len(chunks[-1]) < size and cost(chunks[-1] + [i]) <= cost(chunks[-1]) + len(prompts[i]):
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqs`` right-aligned in one ``pad_id`` tensor as wide as the longest, and the mask of their tokens."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):  # left padding: every sequence ends in the last column
        ids[row, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids, mask


def _prefill(model: Any, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """KV cache, attention mask and last-position logits of ``prompts`` (one forward after the shared prefix)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    shared = _shared_prefix(prompts)
    if shared:
        model(input_ids=torch.tensor([list(prompts[0][:shared])]), cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(prompts))
    # [prefix][pad][suffix]: every prompt ends where generation starts.
    ids, suffix_mask = left_pad([p[shared:] for p in prompts], pad_id)
    mask = torch.cat([torch.ones((len(prompts), shared), dtype=torch.long), suffix_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return cache, mask, out.logits[:, -1]


def _stack(parts: list[tuple[Any, torch.Tensor, torch.Tensor]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One batch from several prefilled chunks: caches and masks left-padded (masked zeros) to one width."""
    cache, _, _ = parts[0]
    width = max(m.shape[1] for _, m, _ in parts)
    mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m, _ in parts])
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            tensors = [getattr(c.layers[i], name) for c, _, _ in parts]
            setattr(layer, name, torch.cat([torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))
                                            for t in tensors]))
    return cache, mask, torch.cat([logits for _, _, logits in parts])


def greedy_group(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                  prefill_size: int, stop: Any) -> list[list[int]]:
    """Greedy new ids of one decode group, in the order of ``prompts``."""
    pad_id, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    chunks = _prefill_chunks(prompts, prefill_size)
    parts = [_prefill(model, [prompts[i] for i in chunk], pad_id) for chunk in chunks]
    cache, mask, logits = _stack(parts) if len(parts) > 1 else parts[0]
    rows = [i for chunk in chunks for i in chunk]  # batch row k holds prompt rows[k]
    positions = torch.tensor([len(prompts[r]) for r in rows])
    out: list[list[int]] = [[] for _ in prompts]
    while True:
        tokens = logits.argmax(-1)
        for k, r in enumerate(rows):
            out[r].append(int(tokens[k]))
        done = [out[r][-1] == eos or len(out[r]) >= budgets[r] for r in rows]
        if stop is not None:
            tail, _ = left_pad([list(prompts[r]) + out[r] for r in rows], pad_id)
            done = [d or bool(s) for d, s in zip(done, stop(tail, None))]
        keep = [k for k, d in enumerate(done) if not d]
        if not keep:
            return out
        if len(keep) < len(rows):  # finished rows leave: the batch never computes padding
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            mask, tokens, positions = mask[index], tokens[index], positions[index]
            rows = [rows[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        positions = positions + 1

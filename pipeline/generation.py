"""Batched greedy generation: left-padded, KV cache on, prompts sorted by length.

Sorting by (token budget, prompt length) keeps padding small inside each batch and
lets a batch stop as soon as its own longest budget is spent; results are returned in
the caller's order.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm


def until_eos(new_ids: Sequence[int], eos_id: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is padding)."""
    ids = list(new_ids)
    return ids[: ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids


def generate_ids(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 batch_size: int, stop_strings: Sequence[str] = (), desc: str = "generate") -> list[list[int]]:
    """Greedy new token ids of each prompt (at most ``max_new_tokens[i]``, ending at EOS if reached)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (max_new_tokens[i], len(prompt_ids[i])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    for batch in tqdm(batches, desc=desc, unit="batch"):
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            n = len(prompt_ids[i])
            ids[row, width - n:] = torch.tensor(prompt_ids[i])
            mask[row, width - n:] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=max(max_new_tokens[i] for i in batch), pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id, **extra)
        for row, i in enumerate(batch):
            outputs[i] = until_eos(out[row, width:][: max_new_tokens[i]].tolist(), tokenizer.eos_token_id)
    return outputs


def decode(tokenizer: Any, new_ids: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
    """Answer text: special tokens dropped, cut at the first stop string, stripped."""
    text = tokenizer.decode(list(new_ids), skip_special_tokens=True)
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text.strip()


def generate(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
             batch_size: int, stop_strings: Sequence[str] = (), desc: str = "generate") -> list[str]:
    """Greedy completions for tokenized prompts, decoded without special tokens.

    ``max_new_tokens[i]`` is the budget of prompt ``i`` (per task type). Generation
    stops at the tokenizer's EOS and at any of ``stop_strings`` (cut from the text).
    """
    ids = generate_ids(model, tokenizer, prompt_ids, max_new_tokens, batch_size, stop_strings, desc)
    return [decode(tokenizer, new, stop_strings) for new in ids]

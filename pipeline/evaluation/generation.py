"""Batched greedy generation on CPU: shared-prefix KV cache, chunked prefill, rows leave when done.

Prompts are sorted by (token budget, length). Each group of ``decode_batch_size`` of them
is decoded together, after a prefill ``batch_size`` prompts at a time:

- *Prefill* groups prompts that share a token prefix (the chat template's system prompt,
  an instruction's wording) into chunks, runs each chunk's shared prefix once, at batch
  1, and repeats its KV cache across the chunk; only the rest is run batched, left-padded
  after the prefix: ``[prefix][pad][suffix]``. Positions
  come from the attention mask's cumsum, so every real token gets the position it has
  in its unpadded prompt. Prefill is compute-bound on a CPU: skipping the shared part
  and sorting by length (little padding) is what makes it cheaper than per-example.
- *Decode*: chunks' caches are left-padded to one width (masked zeros) and stacked, so
  one forward per step serves the whole group; a step costs mostly one read of the
  weights, whatever the batch. A row leaves the batch at its own EOS, budget or stop
  string, so the batch shrinks instead of computing padding until its longest answer.

Greedy with a plain generation config only (argmax, no logits processors); any other
config or an encoder-decoder falls back to ``model.generate``. Results come back in the
caller's order; they equal per-example ``generate()`` up to float rounding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

# Generation-config fields that make HF's greedy search differ from a bare argmax (a logits
# processor or a forced/minimum length); any of them set means: use model.generate.
_PROCESSOR_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                     "suppress_tokens", "begin_suppress_tokens", "min_new_tokens", "forced_bos_token_id",
                     "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "force_words_ids")


def until_eos(new_ids: Sequence[int], eos_id: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is padding)."""
    ids = list(new_ids)
    return ids[: ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids


def plain_greedy(model: Any) -> bool:
    """Whether HF greedy search on ``model`` is a bare argmax per step (what :func:`generate_ids` runs)."""
    gc = getattr(model, "generation_config", None)
    if getattr(model.config, "is_encoder_decoder", False) or gc is None:
        return False
    unset = all(getattr(gc, f, None) in (None, 0, 1.0, []) for f in _PROCESSOR_FIELDS)
    return unset and not (getattr(gc, "min_length", 0) or 0) > 0


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


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    ids, suffix_mask = _left_pad([p[shared:] for p in prompts], pad_id)
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


def _greedy_group(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                  prefill_size: int, stop: Any) -> list[list[int]]:
    """Greedy new ids of one decode group, in the order of ``prompts``."""
    pad_id, eos = _pad_id(tokenizer), tokenizer.eos_token_id
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
            tail, _ = _left_pad([list(prompts[r]) + out[r] for r in rows], pad_id)
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


def _hf_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                 extra: dict[str, Any]) -> list[list[int]]:
    """``model.generate`` on one left-padded batch (the fallback for configs the own loop does not cover)."""
    pad_id = _pad_id(tokenizer)
    ids, mask = _left_pad(prompts, pad_id)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                         max_new_tokens=max(budgets), pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                         **extra)
    return [until_eos(out[row, width:][:b].tolist(), tokenizer.eos_token_id) for row, b in enumerate(budgets)]


def generate_ids(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 batch_size: int, stop_strings: Sequence[str] = (), desc: str = "generate",
                 decode_batch_size: int | None = None) -> list[list[int]]:
    """Greedy new token ids of each prompt (at most ``max_new_tokens[i]``, ending at EOS if reached).

    ``batch_size`` prompts are prefilled together; ``decode_batch_size`` (default: ``batch_size``)
    are decoded together. ``model.generate`` runs instead, ``batch_size`` at a time, when
    :func:`plain_greedy` is false.
    """
    from transformers import StopStringCriteria

    if any(b < 1 for b in max_new_tokens):
        raise ValueError(f"{desc}: every max_new_tokens must be >= 1, got {min(max_new_tokens)}")
    own = plain_greedy(model)
    group = (decode_batch_size or batch_size) if own else batch_size
    order = sorted(range(len(prompt_ids)), key=lambda i: (max_new_tokens[i], len(prompt_ids[i])))
    stop = StopStringCriteria(tokenizer, list(stop_strings)) if stop_strings else None
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    model.eval()
    for k in tqdm(range(0, len(order), group), desc=desc, unit="batch"):
        chunk = order[k:k + group]
        prompts, budgets = [prompt_ids[i] for i in chunk], [max_new_tokens[i] for i in chunk]
        with torch.inference_mode():
            new = (_greedy_group(model, tokenizer, prompts, budgets, batch_size, stop) if own
                   else _hf_generate(model, tokenizer, prompts, budgets, extra))
        for i, ids in zip(chunk, new):
            outputs[i] = ids
    return outputs


def one_by_one_ids(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                   stop_strings: Sequence[str] = ()) -> list[list[int]]:
    """The reference :func:`generate_ids` is checked and benchmarked against: a plain
    ``model.generate`` on each prompt alone (batch of one, no padding, KV cache on)."""
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    out = []
    with torch.inference_mode():
        for ids, budget in zip(prompt_ids, max_new_tokens):
            x = torch.tensor([list(ids)])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=True,
                               max_new_tokens=budget, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **extra)
            out.append(until_eos(y[0, len(ids):].tolist(), tokenizer.eos_token_id))
    return out


def decode(tokenizer: Any, new_ids: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
    """Answer text: special tokens dropped, cut at the first stop string, stripped."""
    text = tokenizer.decode(list(new_ids), skip_special_tokens=True)
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text.strip()


def generate(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
             batch_size: int, stop_strings: Sequence[str] = (), desc: str = "generate",
             decode_batch_size: int | None = None) -> list[str]:
    """Greedy completions for tokenized prompts, decoded without special tokens.

    ``max_new_tokens[i]`` is the budget of prompt ``i`` (per task type). Generation
    stops at the tokenizer's EOS and at any of ``stop_strings`` (cut from the text).
    """
    ids = generate_ids(model, tokenizer, prompt_ids, max_new_tokens, batch_size, stop_strings, desc,
                       decode_batch_size)
    return [decode(tokenizer, new, stop_strings) for new in ids]

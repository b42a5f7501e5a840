"""Greedy generation for evaluation: per-example answers, batched for speed.

:func:`generate` decodes greedy completions of tokenized prompts. Prompts are sorted by
(token budget, length) and decoded in groups by the batched shared-prefix loop of
:mod:`pipeline.evaluation.batched_greedy` whenever greedy search is a bare argmax
(:func:`plain_greedy`); any other generation config, or an encoder-decoder, goes through
``model.generate``. :func:`one_by_one_ids` is the plain definition both must equal (up to
float rounding): ``model.generate`` on each prompt alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from pipeline.evaluation.batched_greedy import greedy_group, left_pad, pad_id_of

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


def _hf_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                 extra: dict[str, Any]) -> list[list[int]]:
    """``model.generate`` on one left-padded batch (the fallback for configs the own loop does not cover)."""
    pad_id = pad_id_of(tokenizer)
    ids, mask = left_pad(prompts, pad_id)
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
            new = (greedy_group(model, tokenizer, prompts, budgets, batch_size, stop) if own
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

"""Classification by likelihood, as lm-evaluation-harness scores multiple choice.

Each of a task's labels is scored by its log-probability as the completion of the prompt:
the sum of the log-probs of the label's tokens after the prompt's ids. A label is rendered as
the template renders an answer (the label, then what follows the answer in the rendered row,
the end-of-turn token for a chat template), and tokenized on its own as render tokenizes
the completion piece, so the reference label's ids are exactly the row's completion ids.
The argmax is the arm's label: a base model that answers ``★★★★☆`` still gets credit when
it puts most probability on ``4 stars``.

:func:`label_logliks` is the fast path: a batch of prompts run once into a KV cache, then every
label of the batch in one more forward from the repeated cache. :func:`reference_loglik` is its
plain definition, one unpadded sequence and a full log-softmax; ``tests/test_loglik.py`` compares them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from pipeline.evaluation.batched_greedy import left_pad
from pipeline.prompting.pieces import reference_encode


def label_ids(tokenizer: Any, labels: Sequence[str], reference: str, completion: str) -> list[list[int]]:
    """Token ids of each label rendered as the answer is in a row whose reference answer is ``reference``
    and whose rendered ``completion`` it begins (what follows it, e.g. ``<|im_end|>``, follows every label)."""
    suffix = completion[len(reference):] if completion.startswith(reference) else ""
    return reference_encode(tokenizer, [label + suffix for label in labels], False)


def reference_loglik(model: Any, prompt: Sequence[int], option: Sequence[int]) -> float:
    """Sum of log p(option token | everything before it): one sequence, every position's log-softmax."""
    ids = torch.tensor([list(prompt) + list(option)])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(option) - 1)
    return float(sum(logprobs[p, ids[0, p + 1]] for p in positions))


def label_logliks(model: Any, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                  pad_id: int, batch_size: int) -> list[list[float]]:
    """:func:`reference_loglik` of every option of every prompt (``options[i]`` are prompt ``i``'s labels).

    ``batch_size`` prompts at a time, longest first: each prompt is run once (left-padded, into a KV
    cache), the cache is repeated once per label, and every label of the batch goes through one more
    forward. So a row costs one prompt forward however many labels its task has.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[float]] = [[] for _ in prompts]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            scores = _score_chunk(model, [prompts[i] for i in chunk], [options[i] for i in chunk], pad_id)
            for i, row in zip(chunk, scores):
                out[i] = row
    return out


def _score_chunk(model: Any, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                 pad_id: int) -> list[list[float]]:
    """Summed log-probs of each prompt's options: the prompts' forward, then the options' (see label_logliks)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids, mask = left_pad(prompts, pad_id)  # every prompt ends in the last column
    first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
                  use_cache=True, logits_to_keep=1).logits[:, -1]
    owner = torch.tensor([k for k, opts in enumerate(options) for _ in opts])
    cache.batch_select_indices(owner)
    labels = [list(o) for opts in options for o in opts]
    width = max(map(len, labels))
    cont = torch.full((len(labels), width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(labels), width), dtype=torch.long)
    for row, label in enumerate(labels):  # right padding: a pad only follows a label, never precedes a token scored
        cont[row, :len(label)] = torch.tensor(label, dtype=torch.long)
        cont_mask[row, :len(label)] = 1
    positions = mask.sum(dim=1)[owner, None] + torch.arange(width)[None]
    logits = model(input_ids=cont, attention_mask=torch.cat([mask[owner], cont_mask], dim=1), position_ids=positions,
                   cache=cache, use_cache=True).logits
    # Token 0 of a label is predicted by the prompt's last position, token t by the label's token t-1.
    logprobs = torch.cat([first[owner, None], logits[:, :-1]], dim=1).float().log_softmax(dim=-1)
    sums = (logprobs.gather(2, cont[:, :, None])[:, :, 0] * cont_mask).sum(dim=1).tolist()
    out, k = [], 0
    for opts in options:
        out.append(sums[k:k + len(opts)])
        k += len(opts)
    return out


def argmax_labels(logliks: Sequence[Sequence[float]], labels: Sequence[Sequence[str]]) -> list[str]:
    """Each row's most likely label (the first of equals)."""
    return [opts[max(range(len(opts)), key=lambda j: scores[j])] for scores, opts in zip(logliks, labels)]


def classify(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], references: Sequence[str],
             labels: Sequence[Sequence[str]], prompts: Sequence[Sequence[int]], batch_size: int) -> list[str]:
    """The loglik label of each rendered test row: ``references[i]`` is row ``i``'s answer, ``labels[i]``
    its task's label set and ``prompts[i]`` the ids generation starts from."""
    options = [label_ids(tokenizer, ls, ref, r["completion"]) for r, ref, ls in zip(rows, references, labels)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return argmax_labels(label_logliks(model, prompts, options, pad, batch_size), labels)

"""Classification by likelihood, as lm-evaluation-harness scores multiple choice.

Each of a task's labels is scored by its log-probability as the completion of the prompt:
the sum of the log-probs of the label's tokens after the prompt's ids. A label is rendered as
the template renders an answer (the label, then what follows the answer in the rendered row,
the end-of-turn token for a chat template), and tokenized on its own as render tokenizes
the completion piece, so the reference label's ids are exactly the row's completion ids.
The argmax is the arm's label: a base model that answers ``★★★★☆`` still gets credit when
it puts most probability on ``4 stars``.

:func:`label_logliks` is the fast path: every (prompt, label) pair of a batch in one
right-padded forward, the lm_head applied to the label positions only
(:func:`pipeline.core.models.completion_loss`). :func:`reference_loglik` is its plain
definition, one unpadded sequence and a full log-softmax; ``tests/test_loglik.py`` compares them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from pipeline.core.models import IGNORE_INDEX, completion_loss
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
    """:func:`reference_loglik` of every option of every prompt (``options[i]`` are prompt ``i``'s labels),
    ``batch_size`` prompt+label rows per forward, longest first so a batch pads little."""
    pairs = [(i, j) for i, opts in enumerate(options) for j in range(len(opts))]
    pairs.sort(key=lambda p: -(len(prompts[p[0]]) + len(options[p[0]][p[1]])))
    out = [[0.0] * len(opts) for opts in options]
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            seqs = [(prompts[i], options[i][j]) for i, j in chunk]
            ids, mask, labels = _right_pad(seqs, pad_id)
            losses = completion_loss(model, ids, mask, labels, reduction="none")
            for (i, j), part in zip(chunk, torch.split(losses, [len(c) for _, c in seqs])):
                out[i][j] = -float(part.sum())
    return out


def _right_pad(seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt+option rows, right-padded: ids, attention mask, and labels on the option's tokens only."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor([*p, *c], dtype=torch.long)
        mask[row, :n] = 1
        labels[row, len(p):n] = torch.tensor(list(c), dtype=torch.long)
    return ids, mask, labels


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

"""Sequence classification with an encoder: the encoder arm (``encoder.model``, kind ``sequence_classification``).

What the encoder path needs besides the shared stages: the text an encoder reads, the
label map (taken from the train split), tokenized rows, the model with its label head,
the loss, and argmax predictions. The rows keep the causal path's field names (``prompt``,
``completion``, ``input_ids``, ``labels``; here ``labels`` is one class id) so the data
module, the prediction table and the scoring code are shared.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.models import ModelError
from pipeline.core.errors import LabelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

LABELS_FILE = "labels.json"
# What train_encoder writes instead of a model when the arm is off or the data has no
# classification task: {"reason": ...}; evaluate then skips the encoder arm.
SKIPPED_FILE = "skipped.json"


def text_of(example: dict[str, Any], include_instruction: bool) -> str:
    """What the encoder reads: the instruction (when configured) and the input, one paragraph each."""
    parts = [example["instruction"]] if include_instruction else []
    parts.append(example.get("input") or "")
    return "\n\n".join(p for p in parts if p)


def label_map(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``{"labels": [...], "tasks": {task: [label id, ...]}}`` from the train split's classification rows.

    One head serves every classification task; each task predicts only among its own
    labels. A val/test label absent from train raises, naming every such row.
    """
    per_task: dict[str, set[str]] = defaultdict(set)
    for ex in splits["train"]:
        if ex["task_type"] == "classification":
            per_task[ex["task"]].add(ex["output"])
    unseen = [f"{split}.jsonl: id {ex['id']!r} (task {ex['task']!r}): label {ex['output']!r} never occurs in train"
              for split in ("val", "test") for ex in splits[split]
              if ex["task_type"] == "classification" and ex["output"] not in per_task.get(ex["task"], ())]
    if unseen:
        raise LabelError(f"{len(unseen)} val/test label(s) the classifier cannot learn:\n  " + "\n  ".join(unseen[:20]))
    labels = sorted(set().union(*per_task.values())) if per_task else []
    code = {label: i for i, label in enumerate(labels)}
    return {"labels": labels, "tasks": {t: sorted(code[x] for x in v) for t, v in sorted(per_task.items())}}


def template_info(include_instruction: bool, max_length: int, labels: dict[str, Any]) -> dict[str, Any]:
    """The encoder's counterpart of a prompt template: travels with the weights, checked at evaluation."""
    spec = {"include_instruction": include_instruction, "max_length": max_length, "labels": labels}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": "encoder-text", "hash": digest, **spec}


def render_rows(examples: list[dict[str, Any]], labels: dict[str, Any], tokenizer: Any, include_instruction: bool,
                max_length: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenized classification rows of one split, and a report (rows, truncated, skipped tasks).

    Rows of other task types are left out and counted per task in ``skipped``: an encoder
    with a label head has nothing to learn from free text. Over-long texts keep their
    start and the closing special token.
    """
    code = {label: i for i, label in enumerate(labels["labels"])}
    kept = [ex for ex in examples if ex["task_type"] == "classification"]
    skipped = Counter(ex["task"] for ex in examples if ex["task_type"] != "classification")
    texts = [text_of(ex, include_instruction) for ex in kept]
    empty = [ex["id"] for ex, text in zip(kept, texts) if not text]
    if empty:  # e.g. prompt/completion data keeps its whole prompt in `instruction`
        raise LabelError(f"{len(empty)} classification row(s) have no text to read with "
                         f"prompt.include_instruction={include_instruction} (empty input), e.g. {empty[:5]}")
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    rows, truncated = [], 0
    for ex, text, ids in zip(kept, texts, encoded):
        if len(ids) > max_length:
            ids, truncated = ids[:max_length - 1] + ids[-1:], truncated + 1
        rows.append({"id": ex["id"], "task": ex["task"], "task_type": ex["task_type"], "prompt": text,
                     "completion": ex["output"], "input_ids": ids, "labels": code[ex["output"]]})
    lengths = sorted(len(r["input_ids"]) for r in rows)
    report = {"rows": len(rows), "tokens": sum(lengths), "truncated": truncated, "dropped": 0,
              "max_length_seen": lengths[-1] if lengths else 0,
              "median_length": lengths[len(lengths) // 2] if lengths else 0, "skipped": dict(sorted(skipped.items()))}
    return rows, report


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad token ids; ``labels`` is one class id per row."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows])}


def loss(model: "torch.nn.Module", batch: dict[str, "torch.Tensor"], reduction: str = "mean") -> "torch.Tensor":
    """Cross-entropy of the class logits (one value per row with ``reduction="none"``)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction)


def load_classifier(path: str | Path, labels: list[str] | None = None) -> "PreTrainedModel":
    """An encoder checkpoint with a classification head: a new head over ``labels``
    (base checkpoint), or the saved one (``labels=None``, a trained classifier)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    head = {} if labels is None else {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                                      "label2id": {x: i for i, x in enumerate(labels)}}
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32,
                                                                  use_safetensors=True, **head)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the classifier in {path}: {err}") from None


def predict(model: "torch.nn.Module", rows: list[dict[str, Any]], labels: dict[str, Any], pad_id: int,
            batch_size: int) -> tuple[list[int], list[float]]:
    """Argmax class id of each row among its task's labels, and the NLL of its reference label."""
    import torch

    n = len(labels["labels"])
    allowed = {t: torch.tensor([i in set(ids) for i in range(n)]) for t, ids in labels["tasks"].items()}
    preds: list[int] = []
    nll: list[float] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = collate(chunk, pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            mask = torch.stack([allowed[r["task"]] for r in chunk])
            logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            preds += logp.argmax(dim=-1).tolist()
            nll += (-logp.gather(1, batch["labels"][:, None])[:, 0]).tolist()
    return preds, nll

"""The fine-tuned model as one standalone checkpoint: LoRA merged into the base weights by peft.

:func:`load_tuned` loads what train saved, unmerged (the base model with its peft adapter, or
the fully fine-tuned weights); :func:`max_logit_diff` runs prompts through a model and
compares its logits with the ones taken before; :func:`merge` is peft's ``merge_and_unload``.
What makes the saved folder the same bytes for the same adapter: the weights are written
by ``save_pretrained`` (safetensors, fixed metadata), the model is named by its source
(``model.path``), never by the folder it was loaded from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.core.errors import ModelError
from pipeline.core.models import load_causal_lm, require_safetensors

if TYPE_CHECKING:
    import torch


def load_tuned(base_dir: Path, tuned_dir: Path) -> tuple[Any, str]:
    """The trained model, unmerged, in fp32, and its method: ``lora`` (a peft model) or ``full``."""
    if not (tuned_dir / "adapter").is_dir():
        return load_causal_lm(tuned_dir / "model"), "full"
    from peft import PeftModel

    # peft falls back to adapter_model.bin (a pickle) when the safetensors file is missing.
    require_safetensors(tuned_dir / "adapter", "the LoRA adapter", "adapter_model.safetensors", strict=True)
    try:
        return PeftModel.from_pretrained(load_causal_lm(base_dir), str(tuned_dir / "adapter")), "lora"
    except Exception as err:  # a truncated or foreign file: safetensors, json and peft each raise their own
        raise ModelError(f"cannot load the LoRA adapter in {tuned_dir / 'adapter'} ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); re-run the train stage"
                         ) from None


def logits(model: Any, prompts: Sequence[Sequence[int]]) -> list["torch.Tensor"]:
    """Each prompt's logits (one forward per prompt, no padding: nothing but the weights can differ)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([list(p)])).logits[0].float() for p in prompts]


def max_logit_diff(before: Sequence["torch.Tensor"], after: Sequence["torch.Tensor"]) -> float:
    """The largest absolute difference between two lists of logits of the same prompts."""
    return max(float((a - b).abs().max()) for a, b in zip(before, after))


def merge(model: Any, method: str) -> Any:
    """peft's ``merge_and_unload`` for a LoRA model (a plain transformers model comes back); full
    fine-tuning's model as it is."""
    return model.merge_and_unload() if method == "lora" else model


def save(model: Any, tokenizer: Any, out: Path, source: str) -> None:
    """``model`` and ``tokenizer`` as a Hugging Face checkpoint in ``out``, named by ``source``."""
    model.name_or_path = model.config.name_or_path = source
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

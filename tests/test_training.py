"""Training pieces on the 2-layer smoke model: the completion-only loss against the naive one,
batch collation, and a real Lightning run that updates exactly the trainable weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.embedded import generate
from pipeline.core.files import write_json, write_jsonl
from pipeline.core.models import IGNORE_INDEX, apply_finetune, completion_loss, load_causal_lm, load_tokenizer
from pipeline.prompting.templates import make_template
from pipeline.training.module import InstructionTuner, RenderedData, collate
from pipeline.prompting.rows import tokenize_split


def lora_model(smoke_base: Path, smoke_cfg, nonzero_b: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_finetune(load_causal_lm(smoke_base), smoke_cfg.finetune)
    if nonzero_b:  # peft starts lora_B at zero, which would leave lora_A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


def naive_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def test_collate_pads_right_with_no_loss_and_no_attention() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert {t.dtype for t in batch.values()} == {torch.long}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    # Two rows of different lengths: right padding, and prompt masks of different widths.
    return collate([{"input_ids": list(range(100, 112)), "labels": [IGNORE_INDEX] * 7 + list(range(107, 112))},
                    {"input_ids": list(range(300, 307)), "labels": [IGNORE_INDEX] * 3 + list(range(303, 307))}],
                   pad_id=2)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_completion_loss_and_gradients_equal_the_naive_loss(smoke_base: Path, smoke_cfg, batch, method: str) -> None:
    if method == "lora":
        model = lora_model(smoke_base, smoke_cfg, nonzero_b=True)
    else:
        model = apply_finetune(load_causal_lm(smoke_base), dataclasses.replace(smoke_cfg.finetune, method="full"))
    model.eval()  # no dropout: both losses must see the same network
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    ours = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ours_grads = torch.autograd.grad(ours, list(trainable.values()))
    reference = naive_loss(model, batch)
    reference_grads = torch.autograd.grad(reference, list(trainable.values()))

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert len(ours_grads) == len(trainable) > 0
    for name, g, ref in zip(trainable, ours_grads, reference_grads):
        assert ref.abs().sum() > 0, f"{name} has no gradient; the comparison would be vacuous"
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_per_token_losses_sum_to_the_mean(smoke_base: Path, smoke_cfg, batch) -> None:
    model = lora_model(smoke_base, smoke_cfg, nonzero_b=True).eval()
    with torch.no_grad():
        per_token = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="none")
        mean = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert per_token.shape == (9,)  # 5 + 4 completion tokens
    torch.testing.assert_close(per_token.mean(), mean)


@pytest.fixture()
def rendered(tmp_path: Path, smoke_base: Path, smoke_cfg) -> Path:
    """A tiny render-stage output: embedded examples through the real template and tokenizer."""
    tokenizer = load_tokenizer(smoke_base)
    template = make_template(smoke_cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    examples = [e.to_dict() for e in generate(seed=0, n_per_task=4)]
    out = tmp_path / "rendered"
    out.mkdir()
    for split, rows in (("train", examples[:12]), ("val", examples[12:])):
        tokenized, _ = tokenize_split(rows, template, tokenizer, 128, "truncate")
        write_jsonl(out / f"{split}.jsonl", tokenized)
    write_json(out / "template.json", template.to_dict())
    return out


def test_trainer_updates_every_trainable_and_no_frozen_parameter(tmp_path: Path, smoke_base: Path, smoke_cfg,
                                                                 rendered: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = lora_model(smoke_base, smoke_cfg, nonzero_b=False)  # peft's own init, as the train stage uses it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    cfg = dataclasses.replace(smoke_cfg.trainer, max_steps=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, gradient_clip_val=cfg.gradient_clip_val,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path)
    data = RenderedData(rendered, cfg.batch_size, load_tokenizer(smoke_base).pad_token_id, seed=0)
    trainer.fit(InstructionTuner(model, cfg), datamodule=data)

    assert trainer.global_step == 3
    after = dict(model.named_parameters())
    unchanged = sorted(n for n in trainable if torch.equal(before[n], after[n]))
    changed_frozen = sorted(n for n in before if n not in trainable and not torch.equal(before[n], after[n]))
    assert unchanged == []
    assert changed_frozen == []

    # Checkpoints leave the frozen base weights out (a resume reloads them from the base model) ...
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    params = {f"model.{n}" for n, _ in model.named_parameters(remove_duplicate=False)}
    assert {k for k in saved if k in params} == {f"model.{n}" for n in trainable}
    # ... and a checkpoint without a trained weight is refused, not loaded half-trained.
    tuner = trainer.lightning_module
    tuner.on_load_checkpoint({"state_dict": saved})
    assert tuner.strict_loading is False
    del saved[f"model.{sorted(trainable)[0]}"]
    with pytest.raises(KeyError, match="lacks 1 trained weight"):
        tuner.on_load_checkpoint({"state_dict": saved})


def test_adamw_is_fused_except_where_lightning_forbids_clipping_it(smoke_cfg) -> None:
    """The fused AdamW kernel (one pass per parameter) where it may run; Lightning's mixed-precision
    plugin refuses to clip gradients of a fused optimizer, so mixed precision keeps the default."""
    for precision, fused in (("32-true", True), ("bf16-true", True), ("bf16-mixed", None), ("16-mixed", None)):
        tuner = InstructionTuner(torch.nn.Linear(4, 4), dataclasses.replace(smoke_cfg.trainer, precision=precision))
        assert tuner.configure_optimizers()["optimizer"].defaults["fused"] is fused, precision

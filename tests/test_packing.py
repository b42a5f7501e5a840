"""Batching modes and packed rows on the 2-layer smoke model with the real tokenizer: a packed
example computes exactly what it computes alone, and every epoch sees every example once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.embedded import generate
from pipeline.core.files import write_json, write_jsonl
from pipeline.core.models import apply_finetune, completion_loss, load_causal_lm, load_tokenizer
from pipeline.training.packing import (best_fit_decreasing, collate_packed, document_lengths, epoch_batches, packed_sdpa,
                              use_packed_attention)
from pipeline.prompting.templates import make_template
from pipeline.training.module import EpochSampler, InstructionTuner, RenderedData, collate, prepare_for_batching
from pipeline.prompting.rows import tokenize_split


@pytest.fixture(scope="module")
def rows(smoke_base: Path, smoke_cfg) -> list[dict]:
    tokenizer = load_tokenizer(smoke_base)
    template = make_template(smoke_cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    examples = [e.to_dict() for e in generate(seed=0, n_per_task=4)]
    tokenized, _ = tokenize_split(examples, template, tokenizer, 128, "truncate")
    return tokenized


@pytest.mark.parametrize("method", ["lora", "full"])
def test_packed_example_equals_the_example_alone(smoke_base: Path, smoke_cfg, rows, method: str) -> None:
    torch.manual_seed(0)
    model = apply_finetune(load_causal_lm(smoke_base), dataclasses.replace(smoke_cfg.finetune, method=method))
    use_packed_attention(model)
    model.eval()
    docs = rows[:4]
    packed = collate_packed(docs)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in docs))
    assert "attention_mask" not in packed  # an all-ones mask would join the documents
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        row_logits = core(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for r in docs:
            alone = collate([r], pad_id=0)
            logits = core(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits[0]
            n = len(r["input_ids"])
            torch.testing.assert_close(row_logits[start:start + n], logits, atol=1e-5, rtol=0)
            start += n
        per_token_packed = completion_loss(model, packed["input_ids"], None, packed["labels"], reduction="none",
                                           position_ids=packed["position_ids"])
        per_token_alone = torch.cat([completion_loss(model, b["input_ids"], b["attention_mask"], b["labels"],
                                                     reduction="none") for b in (collate([r], 0) for r in docs)])
    assert per_token_packed.numel() == sum(sum(1 for t in r["labels"][1:] if t != -100) for r in docs) > 0
    torch.testing.assert_close(per_token_packed, per_token_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_token_packed.mean(), per_token_alone.mean(), atol=1e-5, rtol=0)


def _block_causal_reference(q, k, v, lengths, scale):
    """Attention over the whole row with an explicit mask: key j is visible to query i when both lie
    in the same document and j <= i. Plain matmul and softmax, key/value heads repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(sum(lengths))
    visible = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [1, T, heads, dim], as attention functions return


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flash varlen attention needs a CUDA GPU"))])
def test_packed_attention_equals_a_block_causal_mask(device: str) -> None:
    """Values and gradients of packed_sdpa (grouped key/value heads, a one-token document) against
    the explicit block-causal mask; on CUDA under bf16 autocast it is one flash varlen call."""
    torch.manual_seed(0)
    lengths = [5, 1, 9, 4]
    positions = torch.tensor([[p for n in lengths for p in range(n)]], device=device)
    q, k, v = (torch.randn(1, h, sum(lengths), 16, device=device, requires_grad=True) for h in (4, 2, 2))
    module = torch.nn.Module()  # the attention module: only .training is read
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out, _ = packed_sdpa(module, q, k, v, None, scaling=0.25, position_ids=positions)
    ref = _block_causal_reference(q, k, v, lengths, 0.25)
    tol = 1e-5 if device == "cpu" else 2e-2  # bf16 on the GPU
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=tol * 10, rtol=tol * 10)
    if device == "cuda":
        from pipeline.training import packing
        assert packing._VARLEN["ok"], "the flash varlen path was not taken"


def test_document_lengths_start_at_the_row_and_at_each_restart() -> None:
    assert document_lengths(torch.tensor([[0, 1, 2, 0, 1]])) == [3, 2]
    assert document_lengths(torch.tensor([[3, 4, 0, 1, 2]])) == [2, 3]  # a row need not begin at position 0
    assert document_lengths(torch.tensor([[0, 0, 0]])) == [1, 1, 1]


def test_packed_attention_reads_positions_changed_in_place() -> None:
    """The per-forward cache of document lengths must not outlive an in-place edit of the positions."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5]])
    alone, _ = packed_sdpa(torch.nn.Module(), q, q, q, None, position_ids=positions)
    positions[0, 3:] = torch.arange(3)  # now two documents of 3
    split, _ = packed_sdpa(torch.nn.Module(), q, q, q, None, position_ids=positions)
    torch.testing.assert_close(split[:, :3], alone[:, :3])
    assert (split[:, 3:] - alone[:, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(split, _block_causal_reference(q, q, q, [3, 3], 8 ** -0.5), atol=1e-5, rtol=0)


def test_plain_sdpa_with_restarting_positions_would_join_documents(smoke_base: Path, rows) -> None:
    """Why the packed attention exists: transformers' sdpa, given only position_ids, lets documents mix."""
    model = load_causal_lm(smoke_base).eval()
    packed = collate_packed(rows[:2])
    n = len(rows[0]["input_ids"])
    with torch.no_grad():
        second_alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
        joined = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, n:]
    assert (joined - second_alone).abs().max() > 1e-3


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=80), capacity=st.integers(16, 1024),
       batch_size=st.integers(1, 9), epoch=st.integers(0, 5),
       mode=st.sampled_from(["dynamic", "length_grouped", "packed"]))
def test_every_epoch_sees_every_example_exactly_once(lengths, capacity, batch_size, epoch, mode) -> None:
    batches = epoch_batches(mode, lengths, batch_size, capacity, seed=3, epoch=epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert len(batches) == len(epoch_batches(mode, lengths, batch_size, capacity, seed=3, epoch=epoch + 1))
    if mode == "packed":  # bins respect the budget, except a row that alone exceeds it
        assert all(sum(lengths[i] for i in b) <= capacity or len(b) == 1 for b in batches)
    else:
        assert all(len(b) <= batch_size for b in batches)


def test_best_fit_decreasing_fills_bins() -> None:
    bins = best_fit_decreasing([6, 5, 4, 3, 2, 2, 1, 1], capacity=8)
    assert sorted(sorted(b) for b in bins) == [[0, 4], [1, 3], [2, 5, 6, 7]]  # 8, 8, 8: no waste


def test_length_grouped_batches_are_similar_and_shuffled() -> None:
    lengths = list(range(100))
    a = epoch_batches("length_grouped", lengths, 10, 0, seed=0, epoch=0)
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) == 9 for b in a)
    assert [min(b) for b in a] != sorted(min(b) for b in a)  # batch order shuffled


def test_resumed_sampler_continues_where_it_stopped() -> None:
    lengths = [5, 80, 33, 12, 60, 7, 7, 40, 21, 90, 3]
    full = list(EpochSampler(lengths, 3, seed=1, mode="packed", pack_length=100))
    resumed = EpochSampler(lengths, 3, seed=1, mode="packed", pack_length=100)
    resumed.skip = 2
    assert list(resumed) == full[2:]
    assert list(resumed) == full  # skip applies once


def test_packed_training_runs_and_reads_each_row_once_per_epoch(tmp_path: Path, smoke_base: Path, smoke_cfg,
                                                                  rows) -> None:
    out = tmp_path / "rendered"
    out.mkdir()
    write_jsonl(out / "train.jsonl", rows[:12])
    write_jsonl(out / "val.jsonl", rows[12:14])
    write_json(out / "template.json", {})
    L.seed_everything(0, verbose=False)
    cfg = dataclasses.replace(smoke_cfg.trainer, batching="packed", pack_length=256, max_steps=2)
    model = apply_finetune(load_causal_lm(smoke_base), smoke_cfg.finetune)
    plan = prepare_for_batching(model, cfg, [len(r["input_ids"]) for r in rows[:12]])
    assert (plan.batching, plan.pack_length) == ("packed", 256)
    data = RenderedData(out, cfg.batch_size, 0, seed=0, batching="packed", pack_length=256)
    data.setup()
    seen = [i for b in data.train_dataloader().batch_sampler for i in b]
    assert sorted(seen) == list(range(12))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(InstructionTuner(model, cfg), datamodule=data)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])


@pytest.mark.parametrize("mode", ["dynamic", "length_grouped", "packed"])
@pytest.mark.parametrize("multiple", [2, 3])
def test_an_epoch_holds_whole_optimizer_steps_with_accumulation(mode: str, multiple: int) -> None:
    """With gradient accumulation over ``multiple`` batches, every epoch has a multiple of that many
    batches (so no step straddles two epochs), the same count each epoch, and each row once."""
    lengths = [5, 80, 33, 12, 60, 7, 7, 40, 21, 90, 3, 44, 18]
    counts = set()
    for epoch in range(3):
        batches = epoch_batches(mode, lengths, 3, 100, seed=0, epoch=epoch, multiple=multiple)
        assert len(batches) % multiple == 0
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        counts.add(len(batches))
    assert len(counts) == 1
    sampler = EpochSampler(lengths, 3, seed=0, mode=mode, pack_length=100, multiple=multiple)
    assert len(sampler) % multiple == 0

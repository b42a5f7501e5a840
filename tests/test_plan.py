"""The batching plan (trainer.batching/pack_length/gradient_checkpointing = auto) on the 2-layer smoke
model: auto packs where the probe finds packing exact and only there, a packed row holds a batch's
worth of tokens, and activation checkpointing saves memory without changing a single gradient."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.core.models import apply_finetune, load_causal_lm
from pipeline.training import packing, plan
from pipeline.training.module import token_loss


@pytest.fixture()
def model(smoke_base: Path, smoke_cfg):
    torch.manual_seed(0)
    return apply_finetune(load_causal_lm(smoke_base), smoke_cfg.finetune)


def _auto(smoke_cfg, **changes):
    return dataclasses.replace(smoke_cfg.trainer, batching="auto", pack_length="auto", **changes)


def test_auto_packs_a_model_whose_packing_is_exact(model, smoke_cfg) -> None:
    chosen = plan.resolve(model, _auto(smoke_cfg), [10, 20, 30, 40], token_loss)
    assert chosen.batching == "packed" and "exact" in chosen.why
    assert model.get_base_model().config._attn_implementation == packing.PACKED_ATTENTION
    # pack_length auto: batch_size (4 in the smoke config) x the mean row (25), as many tokens as a batch
    assert chosen.pack_length == 100 == chosen.micro_batch_tokens and chosen.micro_batches == 1


def test_pack_length_auto_is_never_shorter_than_the_longest_row() -> None:
    assert plan.pack_length("auto", 2, [10, 10, 100]) == 100
    assert plan.pack_length("auto", 8, [10, 20]) == 120
    assert plan.pack_length(64, 8, [10, 20]) == 64
    assert plan.pack_length("auto", 8, [10, 20], micro_batches=2) == 60


def test_micro_batches_auto_splits_a_step_until_a_pass_fits_the_budget(model, smoke_cfg) -> None:
    """A step of 8 x 300 tokens against a budget of about 1000 tokens' activations: three packed
    passes of 800, no recomputation; the Trainer accumulates them into one optimizer step."""
    per_token = plan.activation_bytes_per_token(model, token_loss)
    budget = max(1, round(per_token * 1000 / 2**20))
    cfg = _auto(smoke_cfg, batch_size=8, activation_budget_mb=budget)
    chosen = plan.resolve(model, cfg, [300] * 16, token_loss)
    assert (chosen.micro_batches, chosen.pack_length, chosen.gradient_checkpointing) == (3, 800, False)
    assert chosen.activation_mb <= budget
    run = chosen.trainer(cfg)
    assert (run.accumulate_grad_batches, run.pack_length, run.batching) == (3, 800, "packed")
    # Padded batches split into divisors of batch_size (a step keeps its 8 rows): 4 passes of 2 rows.
    padded = plan.resolve(model, dataclasses.replace(cfg, batching="dynamic"), [300] * 16, token_loss)
    assert (padded.micro_batches, padded.batch_size, padded.micro_batch_tokens) == (4, 2, 600)
    # Past the shortest useful pass, the rest is recomputation's job.
    tight = plan.resolve(model, dataclasses.replace(cfg, activation_budget_mb=1), [300] * 16, token_loss)
    assert tight.micro_batch_tokens >= plan.MIN_MICRO_TOKENS and tight.gradient_checkpointing
    fixed = plan.resolve(model, dataclasses.replace(cfg, micro_batches=1, gradient_checkpointing=False),
                         [300] * 16, token_loss)
    assert (fixed.micro_batches, fixed.pack_length, fixed.gradient_checkpointing) == (1, 2400, False)


def test_auto_pads_when_the_probe_sees_documents_attend_to_each_other(model, smoke_cfg, monkeypatch) -> None:
    """A model whose attention ignores the document boundaries (here: one causal pass over the whole
    packed row) is caught by the probe, and keeps its own attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True,
                                      **{k: v for k, v in kwargs.items() if k != "is_causal"})

    AttentionInterface.register("leaky_test", leaky)

    def install(m):  # type: ignore[no-untyped-def]
        core = m.get_base_model()
        previous = core.config._attn_implementation
        core.config._attn_implementation = "leaky_test"
        return previous

    monkeypatch.setattr(packing, "use_packed_attention", install)
    before = model.get_base_model().config._attn_implementation
    chosen = plan.resolve(model, _auto(smoke_cfg), [10, 20], token_loss)
    assert chosen.batching == "dynamic" and "not honoured" in chosen.why
    assert model.get_base_model().config._attn_implementation == before
    assert chosen.micro_batch_tokens == smoke_cfg.trainer.batch_size * 20


def test_auto_pads_with_several_processes(model, smoke_cfg) -> None:
    chosen = plan.resolve(model, _auto(smoke_cfg, devices=2), [10, 20], token_loss)
    assert chosen.batching == "dynamic" and "several processes" in chosen.why


def test_checkpointing_auto_follows_the_measured_activations(model, smoke_cfg) -> None:
    per_token = plan.activation_bytes_per_token(model, token_loss)
    assert per_token > 0
    lengths = [50] * 8
    tokens = plan.pack_length("auto", smoke_cfg.trainer.batch_size, lengths)
    mb = per_token * tokens / 2**20
    low = plan.resolve(model, _auto(smoke_cfg, micro_batches=1, activation_budget_mb=1), lengths, token_loss)
    assert low.activation_mb == pytest.approx(mb, abs=0.1) and low.gradient_checkpointing == (mb > 1)
    high = plan.resolve(model, _auto(smoke_cfg, micro_batches=1, activation_budget_mb=10**6), lengths, token_loss)
    assert not high.gradient_checkpointing
    forced = plan.resolve(model, _auto(smoke_cfg, gradient_checkpointing=True, activation_budget_mb=10**6),
                          lengths, token_loss)
    assert forced.gradient_checkpointing


def test_checkpointing_keeps_fewer_activations_and_the_same_gradients(smoke_base: Path, smoke_cfg) -> None:
    grads, saved = [], []
    for on in (False, True):
        torch.manual_seed(0)
        m = apply_finetune(load_causal_lm(smoke_base), smoke_cfg.finetune)
        plan.apply_checkpointing(m, on)
        saved.append(plan.activation_bytes_per_token(m, token_loss, tokens=96))
        ids = torch.arange(3, 99)[None]
        labels = ids.clone()
        labels[:, :40] = -100
        m.train()
        token_loss(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    # Only each layer's input outlives the forward pass; the kept logits of the loss positions
    # (vocabulary 49k, hidden 64: most of what this 2-layer model saves) do not shrink.
    assert saved[1] < 0.9 * saved[0], saved
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_checkpoint_of_another_plan_is_not_resumed(tmp_path: Path) -> None:
    """resume.json keeps the plan; a run resolving another plan refuses to skip into a different
    batch sequence and says which settings to pin."""
    from pipeline import train
    from pipeline.core.files import read_json, write_json

    write_json(tmp_path / "resume.json", {"fingerprint": "f", "run_id": "r"})
    old = {"batching": "packed", "pack_length": 642, "micro_batches": 1}
    train._keep_plan(tmp_path, None, old, rank_zero=True)
    assert read_json(tmp_path / "resume.json")["plan"] == old
    train._keep_plan(tmp_path, read_json(tmp_path / "resume.json"), old, rank_zero=True)  # same plan: resumes
    with pytest.raises(train.PlanChanged, match="trainer.batching, pack_length and micro_batches"):
        train._keep_plan(tmp_path, read_json(tmp_path / "resume.json"), {**old, "micro_batches": 2}, rank_zero=True)


@pytest.mark.parametrize("override, field", [
    ("encoder.trainer.batching=auto", "encoder.trainer.batching"),
    ("encoder.trainer.micro_batches=auto", "encoder.trainer.micro_batches"),
    ("align.trainer.gradient_checkpointing=true", "align.trainer.gradient_checkpointing"),
    ("align.trainer.micro_batches=4", "align.trainer.micro_batches"),
])
def test_stages_without_a_plan_refuse_auto_settings(override: str, field: str) -> None:
    """The encoder arm and the align stage take no batching plan: a setting that asks for one is a
    config error naming the field, not a crash after the model loads or a silent no-op."""
    from pipeline.core.config import ConfigError, from_mapping
    from pipeline.params import compose

    with pytest.raises(ConfigError, match=field):
        from_mapping(compose([override, *(["align=dpo"] if field.startswith("align") else [])]), source=override)

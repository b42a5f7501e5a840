"""The DPO loss against the paper's formula written out, and DPO steps that make a tiny model prefer
the chosen answers of the embedded pairs it trained on (held-out pairs too)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pipeline.core.files import read_json, read_jsonl
from pipeline.data import preferences
from pipeline.data.schema import Example
from pipeline.training.dpo import collate_pairs, dpo_loss, pair_row, preference_accuracy, sequence_logps


def paper_loss(pc: float, pr: float, rc: float, rr: float, beta: float, ls: float) -> float:
    """Rafailov et al. (2023), eq. 7, with conservative-DPO label smoothing (Mitchell 2023):
    -(1-ls) log sigma(beta h) - ls log sigma(-beta h), h = log pi(yw)/ref(yw) - log pi(yl)/ref(yl)."""
    h = (pc - rc) - (pr - rr)

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    return -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.1)])
def test_dpo_loss_equals_the_papers_formula(beta: float, ls: float) -> None:
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(16, generator=gen, dtype=torch.float64) for _ in range(4))
    losses, reward_c, reward_r = dpo_loss(pc, pr, rc, rr, beta, ls)
    expected = [paper_loss(*map(float, v), beta, ls) for v in zip(pc, pr, rc, rr)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert reward_c.tolist() == pytest.approx((beta * (pc - rc)).tolist())
    assert reward_r.tolist() == pytest.approx((beta * (pr - rr)).tolist())
    # At the reference (policy == reference) the loss is log 2 whatever beta and ls.
    assert dpo_loss(pc, pr, pc, pr, beta, ls)[0].tolist() == pytest.approx([math.log(2)] * 16)


def test_sequence_logps_sum_the_completion_tokens_only(smoke_base: Path) -> None:
    from pipeline.core.models import load_causal_lm

    model = load_causal_lm(smoke_base).eval()
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}]
    pair = [pair_row("a", rows[0], rows[1])]
    with torch.no_grad():
        got = sequence_logps(model, collate_pairs(pair, 0))
        logits = model(torch.tensor([rows[0]["input_ids"]])).logits.log_softmax(-1)[0]
    by_hand = sum(float(logits[i - 1, t]) for i, t in enumerate(rows[0]["input_ids"]) if i >= 2)
    assert float(got[0]) == pytest.approx(by_hand, abs=1e-4)


def _rows(smoke_data: Path, split: str, tokenizer) -> list[dict]:
    from pipeline.prompting.rows import tokenize_split
    from pipeline.prompting.templates import Template

    template = Template.from_dict(read_json(smoke_data / "rendered" / "template.json"))
    pairs = preferences.from_examples([Example.from_dict(r) for r in read_jsonl(smoke_data / "prepared" /
                                                                                 f"{split}.jsonl")], 42)
    chosen, wrong = (tokenize_split([p.to_dict() for p in side], template, tokenizer, 256, "truncate",
                                    last_only=True)[0] for side in (pairs, [preferences.rejected(p) for p in pairs]))
    return [pair_row(c["id"], c, w) for c, w in zip(chosen, wrong)]


def test_dpo_steps_raise_the_preference_metric(smoke_data: Path, smoke_cfg, tokenizer) -> None:
    """A random-init 2-layer model with a LoRA adapter: 24 DPO steps on the embedded train pairs
    (the real Trainer) make it prefer chosen on more train pairs and more held-out pairs."""
    import lightning as L

    from pipeline.core.models import apply_finetune, load_causal_lm
    from pipeline.training import fit
    from pipeline.training.dpo import PairData, PreferenceTuner, reference_logps
    from pipeline.training.module import LossCurve

    L.seed_everything(0, verbose=False)
    model = apply_finetune(load_causal_lm(smoke_data / "base"), smoke_cfg.finetune)
    train, test = _rows(smoke_data, "train", tokenizer), _rows(smoke_data, "test", tokenizer)
    pad = tokenizer.pad_token_id
    before = (sum(preference_accuracy(model, train, pad, 8)), sum(preference_accuracy(model, test, pad, 8)))
    reference_logps(model, train, pad, 8)
    work = smoke_data.parent / "dpo_rows"
    from pipeline.core.files import write_jsonl

    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "val.jsonl", train[:4])
    t = dataclasses.replace(smoke_cfg.trainer, max_steps=24, lr=5e-3, val_check_interval=24, batch_size=4)
    trainer = fit.build_trainer(t, LossCurve(work / "curves"), work, "x", None, None, enable_checkpointing=False)
    trainer.fit(PreferenceTuner(model, t, 0.5, 0.0), datamodule=PairData(work, 4, pad, 0, 0, collate_pairs))
    after = (sum(preference_accuracy(model, train, pad, 8)), sum(preference_accuracy(model, test, pad, 8)))
    logged = trainer.callback_metrics
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"} <= set(logged)
    print(f"pairs preferring chosen, train {before[0]:.0f} -> {after[0]:.0f} of {len(train)}, "
          f"held-out {before[1]:.0f} -> {after[1]:.0f} of {len(test)}")
    assert after[0] > before[0] and after[1] > before[1], (before, after, len(train), len(test))

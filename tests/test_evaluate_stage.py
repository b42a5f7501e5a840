"""The evaluate stage on the smoke model and the embedded smoke data: the zero-shot baseline through
the CLI (no trained model, its own MLflow run), base vs an identical 'tuned' model, task-type overrides."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipeline import evaluate
from pipeline.core.cli import guard
from pipeline.core.config import ConfigError, PipelineConfig
from pipeline.core.files import read_json, read_jsonl
from pipeline.params import compose, dump


@pytest.fixture(scope="module")
def data(smoke_data: Path) -> Path:
    return smoke_data


def with_eval(cfg: PipelineConfig, **changes) -> PipelineConfig:
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **changes))


def test_zero_shot_baseline_from_the_cli_without_a_tuned_model(tmp_path: Path, monkeypatch, data: Path,
                                                              smoke_base: Path) -> None:
    from mlflow.tracking import MlflowClient

    params = tmp_path / "params.yaml"
    params.write_text(dump(compose(["+experiment=smoke", "eval.models=[base]"])))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "baseline-exp")
    out = tmp_path / "eval"
    code = evaluate.main(["--params", str(params), "--rendered", str(data / "rendered"), "--prepared",
                          str(data / "prepared"), "--base-model", str(smoke_base), "--out", str(out)])
    assert code == 0
    metrics = read_json(out / "metrics.json")
    assert set(metrics) == {"base", "safety"}  # no tuned model, so no delta; the outputs' safety review
    assert set(metrics["base"]) == {"topic", "qa", "past_tense", "summary", "overall"}
    intervals = read_json(out / "intervals.json")["intervals"]["base"]
    for task, values in metrics["base"].items():
        assert set(intervals[task]) == set(values), task  # an interval on every reported metric
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == len(read_jsonl(data / "rendered" / "test.jsonl"))
    topic = next(r for r in rows if r["task"] == "topic")
    assert set(topic["base_scores"]) == {"correct", "unmatched", "correct_loglik"} and "base_label" in topic
    assert topic["base_label_loglik"] != "<unmatched>"  # loglik always picks one of the labels
    assert "tuned_prediction" not in topic
    for name in ("per_task.json", "confusion/topic_base.json", "plots/per_task.png", "plots/confusion_topic.png",
                 "report.md"):
        assert (out / name).is_file(), name
    assert {"actual", "predicted"} == set(read_json(out / "confusion" / "topic_base.json")[0])

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("instruction-tuning").experiment_id])
    assert run.data.tags["eval.baseline"] == "zero-shot"
    assert run.data.tags["dvc.exp_name"] == "baseline-exp"
    assert run.data.tags["template.hash"] == read_json(data / "rendered" / "template.json")["hash"]
    assert run.data.params["eval.models"] == "['base']"
    assert run.data.metrics["eval_base/topic/accuracy"] == metrics["base"]["topic"]["accuracy"]
    assert "eval_base/overall/score" in run.data.metrics  # sections in MLflow's chart view: eval_base/...
    headline = read_json(out / "headline.json")
    assert headline["base"]["topic"] == {"accuracy": metrics["base"]["topic"]["accuracy"]}
    assert "| base | topic | accuracy |" in run.data.tags["mlflow.note.content"]  # the run's description
    experiment = client.get_experiment_by_name("instruction-tuning")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    # The test split, with the pipeline's hash as its digest (mlflow.genai.evaluate logs its table too).
    [test_input] = [d for d in run.inputs.dataset_inputs if [t.value for t in d.tags] == ["test"]]
    assert test_input.dataset.name == "test"
    assert test_input.dataset.digest == run.data.tags["data.hash"][:36]
    # Example by example, as MLflow's own evaluation: one trace per row with the pipeline's scores.
    import mlflow

    traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list")
    assert len(traces) == len(rows)
    by_id = {r["id"]: r for r in rows}
    for trace in traces:
        row = by_id[json.loads(trace.data.request)["id"]]
        assessments = {a.name: a.value for a in trace.info.assessments}
        assert json.loads(trace.data.response) == row["base_prediction"]
        assert assessments["expected_response"] == row["reference"]
        assert {k: v for k, v in assessments.items() if k.startswith("examples/")} == {
            f"examples/{k}": v for k, v in row["base_scores"].items()}
    assert {"eval/predictions.json", "eval/metrics.json", "eval/plots"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "eval")}


def test_tuned_requested_without_a_tuned_model_fails_clearly(tmp_path: Path, data: Path, smoke_base: Path,
                                                            capsys) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(dump(compose(["+experiment=smoke"])))
    argv = ["--params", str(params), "--rendered", str(data / "rendered"), "--prepared", str(data / "prepared"),
            "--base-model", str(smoke_base), "--tuned", str(tmp_path / "nope"), "--out", str(tmp_path / "eval")]
    code = guard("evaluate", lambda: evaluate.main(argv))  # what `python -m pipeline.evaluate` runs
    assert code == 1
    assert "eval.models=[base]" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_identical_tuned_model_has_zero_deltas_and_task_type_override(tmp_path: Path, data: Path,
                                                                     smoke_base: Path, smoke_cfg) -> None:
    from pipeline.core.models import load_causal_lm

    tuned = tmp_path / "tuned"
    load_causal_lm(smoke_base).save_pretrained(tuned / "model")  # full weights, equal to the base
    shutil.copy(data / "rendered" / "template.json", tuned / "template.json")
    cfg = with_eval(smoke_cfg, task_types={"past_tense": "short_answer"})
    metrics = evaluate.run(cfg, evaluate.Paths(data / "rendered", data / "prepared", smoke_base, tmp_path / "eval", tuned), None)
    assert set(metrics) == {"base", "base_kshot", "tuned", "delta", "delta_tuned_vs_base_kshot",
                            "delta_base_kshot_vs_base", "safety"}
    assert {"exact_match", "token_f1", "perplexity"} == set(metrics["base"]["past_tense"])  # now short_answer
    assert metrics["tuned"] == metrics["base"]
    deltas = read_json(tmp_path / "eval" / "intervals.json")["intervals"]["delta"]
    assert set(deltas["topic"]) == set(metrics["base"]["topic"])  # a paired test on every metric
    for task, per in deltas.items():
        for metric, d in per.items():
            assert d["delta"] == 0.0 and d["p_value"] == 1.0, (task, metric)
    assert read_json(tmp_path / "eval" / "intervals.json")["task_types"]["past_tense"] == "short_answer"


def test_task_type_override_must_name_a_task(data: Path) -> None:
    rows = read_jsonl(data / "rendered" / "test.jsonl")
    assert evaluate.resolve_task_types(rows, {"qa": "free_text"})["qa"] == "free_text"
    with pytest.raises(ConfigError, match=r"eval.task_types.nope: no task 'nope'"):
        evaluate.resolve_task_types(rows, {"nope": "classification"})


def test_config_rejects_an_unknown_task_type(smoke_cfg) -> None:
    from pipeline.core.config import from_mapping

    with pytest.raises(ConfigError, match="eval.task_types.qa: 'essay' is not one of"):
        from_mapping(compose(["+experiment=smoke", "+eval.task_types.qa=essay"]))

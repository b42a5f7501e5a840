"""MLflow's per-example view: every test row becomes one trace with its scores, also on a test split
the size of the default one (the evaluation harness's thread pool once lost most traces on SQLite)."""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking import views


def test_every_row_becomes_a_trace_with_its_scores(tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Its own artifact folder: the store's default (./mlruns) would land in the checkout.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("views", artifact_location=str(tmp_path / "art")))
    rows = [{"id": f"r{i}", "task": "topic", "prompt": f"Topic of item {i}?", "reference": "sports",
             "tuned_prediction": "sports" if i % 3 else "politics",
             "tuned_scores": {"correct": float(i % 3 != 0)}} for i in range(96)]
    with mlflow.start_run() as run:
        views.log_examples(rows, "tuned")
    traces = mlflow.search_traces(locations=[run.info.experiment_id], return_type="list")
    assert len(traces) == 96
    values = sorted(a.value for t in traces for a in t.info.assessments if a.name == "examples/correct")
    assert values == sorted(float(i % 3 != 0) for i in range(96))

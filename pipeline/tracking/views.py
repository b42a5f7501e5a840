"""How a run reads in MLflow's own UI: metric names in sections, the experiment's kind, the
run's datasets, its logged model and its description.

- Metric names use ``/``: MLflow's chart view makes one section per first segment (read from
  the UI bundle of MLflow 3.17: ``metricSectionId`` = the part before the first ``/``). Step
  curves go to ``train/`` and ``val/``; evaluate's metrics to ``eval_<arm>/<task>/<metric>``
  (one section per arm) and the paired differences to ``delta/<a>_vs_<b>/<task>/<metric>``.
  :func:`eval_metric_name` and :func:`eval_metric_key` translate to and from the dotted keys of
  ``metrics.json`` (``tuned.topic.accuracy``), which stay the names DVC and the reports use.
- The experiment is tagged ``mlflow.experimentKind = custom_model_development``: without it
  the UI guesses the kind, and an experiment with logged tables opens in the GenAI view.
- Each run logs the splits it read as MLflow datasets (digest = the pipeline's own file hash)
  and the trained weights as a LoggedModel (MLflow 3) that the evaluation metrics point to.
"""

from __future__ import annotations

import os

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's model-training view (GenAI: genai_development)
NOTE_TAG = "mlflow.note.content"  # the run's description, rendered as Markdown
MODEL_ID_TAG = "pipeline.model_id"  # the LoggedModel train logged: evaluate's metrics point to it
# Lightning's names (module.py) -> sections; the loss curves CSVs keep the old names.
STEP_METRICS = {"train_loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr",
                "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch"}
MAIN_DELTA = "tuned_vs_base"  # metrics.json calls tuned - base just "delta"


def step_metric_name(name: str) -> str:
    """Lightning's metric name as the run shows it: ``train_loss`` -> ``train/loss``."""
    return STEP_METRICS.get(name, name)


def eval_metric_name(key: str) -> str:
    """``metrics.json``'s dotted key -> the MLflow name: ``tuned.topic.accuracy`` ->
    ``eval_tuned/topic/accuracy``, ``delta.overall.score`` -> ``delta/tuned_vs_base/overall/score``,
    ``delta_tuned_vs_encoder.topic.accuracy`` -> ``delta/tuned_vs_encoder/topic/accuracy``."""
    head, *rest = key.split(".")
    if head == "delta":
        return "/".join(["delta", MAIN_DELTA, *rest])
    if head.startswith("delta_"):
        return "/".join(["delta", head[len("delta_"):], *rest])
    return "/".join([f"eval_{head}", *rest])


def eval_metric_key(name: str) -> str | None:
    """The inverse of :func:`eval_metric_name`; None for a metric evaluate did not name."""
    head, *rest = name.split("/")
    if head == "delta" and rest:
        pair, *rest = rest
        return ".".join(["delta" if pair == MAIN_DELTA else f"delta_{pair}", *rest])
    if head.startswith("eval_") and rest:
        return ".".join([head[len("eval_"):], *rest])
    return None


def split_dataset(rows: Sequence[Mapping[str, Any]], path: Path, digest: str, name: str) -> Any:
    """An MLflow dataset of one split: its ``id`` and ``task`` columns (the UI shows the schema and
    row count), the file as its source and the pipeline's hash of that file as its digest."""
    import mlflow.data
    import pandas as pd

    frame = pd.DataFrame([{"id": str(r["id"]), "task": str(r["task"])} for r in rows], columns=["id", "task"])
    with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns that it did
        warnings.filterwarnings("ignore", ".*can be interpreted in multiple ways.*")
        # MLflow stores at most 36 characters of a digest: the start of the pipeline's sha256.
        return mlflow.data.from_pandas(frame, source=str(path.resolve()), name=name, digest=digest[:36])


def log_datasets(client: Any, run_id: str, datasets: Mapping[str, Any]) -> None:
    """``{context: dataset}`` as the run's inputs (the run page's Datasets panel)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client.log_inputs(run_id, [DatasetInput(d._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
                               for context, d in datasets.items()])


def log_model(client: Any, run_id: str, folder: Path, name: str, params: Mapping[str, str],
              model_type: str, digest: str) -> str:
    """``folder`` (the trained weights only: adapter-sized for LoRA, never the base model) as a
    LoggedModel of the run, READY; the run is tagged with its id. Returns the model id."""
    from mlflow.entities import LoggedModelOutput

    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=dict(params),
                                       model_type=model_type, tags={"pipeline.model_digest": digest})
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
    return model.model_id


def headline_markdown(headline: Mapping[str, Any]) -> str:
    """evaluate's ``headline.json`` as the run's description: one row per arm or paired difference."""
    lines = ["| | task | metric | value | 95% CI | p |", "|---|---|---|---|---|---|"]
    for key, per_task in headline.items():
        name = "tuned − base" if key == "delta" else key.removeprefix("delta_").replace("_vs_", " − ")
        for task, fields in per_task.items():
            metric = next(k for k in fields if k not in ("ci_low", "ci_high", "p"))
            ci = (f"[{_num(fields['ci_low'])}, {_num(fields['ci_high'])}]" if "ci_low" in fields else "")
            lines.append(f"| {name} | {task} | {metric} | {_num(fields[metric])} | {ci} | {_num(fields.get('p'))} |")
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def log_examples(rows: Sequence[Mapping[str, Any]], arm: str) -> None:
    """One arm's answers as an MLflow evaluation of the active run, example by example: a trace per
    test row (prompt, answer, reference) with the pipeline's own per-example scores as code
    feedback (``examples/<score>``), so MLflow's evaluation view compares two runs row by row.
    No model or LLM judge is called: the scores are those evaluate computed."""
    import mlflow.genai
    import pandas as pd
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    scored = [r for r in rows if f"{arm}_prediction" in r]
    by_id = {r["id"]: r[f"{arm}_scores"] for r in scored}

    @scorer(name="examples")
    def examples(inputs: dict[str, Any]) -> list[Any]:
        return [Feedback(name=f"examples/{k}", value=float(v)) for k, v in by_id[inputs["id"]].items()
                if v is not None]

    data = pd.DataFrame({"inputs": [{"id": r["id"], "task": r["task"], "prompt": r["prompt"]} for r in scored],
                         "outputs": [r[f"{arm}_prediction"] for r in scored],
                         "expectations": [{"expected_response": r["reference"]} for r in scored]})
    # One worker: the harness's default thread pool writes traces concurrently, and a SQLite store
    # lost most of them (29 of 96 traces logged, in 182 s, on the default test split); one worker
    # logged all 96 in 8 s. The scorer only reads scores already computed, so threads gain nothing.
    previous = os.environ.get("MLFLOW_GENAI_EVAL_MAX_WORKERS")
    os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = "1"
    try:
        mlflow.genai.evaluate(data=data, scorers=[examples])
    finally:
        if previous is None:
            del os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"]
        else:
            os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = previous

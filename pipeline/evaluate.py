"""Stage 5, evaluate: generate on the test split with the base and/or tuned model, score, compare.

Reads ``eval`` and ``tracking`` from params.yaml. Refuses to run when the prompt
template the tuned model was trained with differs from the one that rendered the test
prompts. ``eval.models: [base]`` is a zero-shot baseline that needs no trained model
(``--tuned`` may then be left out) and gets its own MLflow run. Writes to ``--out``:
``metrics.json`` (DVC metrics: per task and overall, for each model and the tuned-minus-base
delta), ``intervals.json`` (95% bootstrap intervals of every metric, paired deltas with
p-values, per-class scores, confusion matrices), ``predictions.jsonl``, ``report.md``,
PNG plots in ``plots/`` and DVC plot data (``per_task.json``, ``confusion/<task>_<model>.json``);
logs the same into MLflow. A trained encoder classifier's answers are its argmax labels,
scored by the same code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline import config
from pipeline.files import hash_files, read_json, read_jsonl, write_json, write_jsonl
from pipeline.models import IGNORE_INDEX


class TemplateMismatch(RuntimeError):
    """The evaluation prompts were rendered with another template than the model's."""


@dataclass(frozen=True)
class Tracking:
    """Where MLflow writes; resolved from the environment by the entry point only."""

    uri: str
    artifact_root: Path
    repo_root: Path
    dvc_exp_name: str | None = None


def check_template(rendered: Path, tuned: Path | None) -> str:
    """Return the template hash; raise if the tuned model was trained with a different one."""
    rendered_hash = read_json(rendered / "template.json")["hash"]
    trained = tuned / "template.json" if tuned is not None else None
    if trained is not None and trained.exists() and read_json(trained)["hash"] != rendered_hash:
        raise TemplateMismatch(
            f"evaluate: the model in {tuned} was trained with prompt template {read_json(trained)['name']!r} "
            f"(hash {read_json(trained)['hash']}) but the test prompts in {rendered} were rendered with hash "
            f"{rendered_hash}. Re-run train with this prompt config, or render with the model's template."
        )
    return rendered_hash


def select_rows(rows: list[dict[str, Any]], max_examples: int | None) -> list[dict[str, Any]]:
    """At most ``max_examples`` rows per task, in file order."""
    if max_examples is None:
        return rows
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for r in rows:
        if seen[r["task"]] < max_examples:
            seen[r["task"]] += 1
            kept.append(r)
    return kept


def resolve_task_types(rows: list[dict[str, Any]], overrides: Mapping[str, str]) -> dict[str, str]:
    """Each task's type: from the data, unless ``eval.task_types`` overrides it."""
    from_data = {r["task"]: r["task_type"] for r in rows}
    unknown = sorted(set(overrides) - set(from_data))
    if unknown:
        raise config.ConfigError([f"eval.task_types.{t}: no task {t!r} in the test split (tasks: "
                                  f"{', '.join(sorted(from_data))})" for t in unknown], "eval.task_types")
    return {t: overrides.get(t, tt) for t, tt in from_data.items()}


def label_sets(prepared: Path, overrides: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Label set of each classification task: every reference seen in train and test."""
    overrides = overrides or {}
    labels: dict[str, set[str]] = defaultdict(set)
    for split in ("train", "test"):
        for ex in read_jsonl(prepared / f"{split}.jsonl"):
            if overrides.get(ex["task"], ex["task_type"]) == "classification":
                labels[ex["task"]].add(ex["output"])
    return {t: sorted(v) for t, v in labels.items()}


def reference_nll(model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each row's reference completion under ``model``."""
    import torch

    from pipeline.models import completion_loss
    from pipeline.training import collate

    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad_id)
            losses = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     reduction="none")
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            for chunk in torch.split(losses, counts):
                out.append((float(chunk.sum()), len(chunk)))
    return out


def classify(tuned: Path, rows: list[dict[str, Any]], pad_id: int,
             batch_size: int) -> tuple[list[str], list[tuple[float, int]]]:
    """A trained encoder's argmax label of each row, and (NLL of the reference label, 1)."""
    from pipeline import encoder

    labels = read_json(tuned / encoder.LABELS_FILE)
    preds, nll = encoder.predict(encoder.load_classifier(tuned / "model"), rows, labels, pad_id, batch_size)
    return [labels["labels"][i] for i in preds], [(x, 1) for x in nll]


def _prompt_ids(row: dict[str, Any]) -> list[int]:
    """The prompt part of a rendered row: every token before the first loss-bearing one."""
    first = next(i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX)
    return row["input_ids"][:first]


def run(cfg: config.PipelineConfig, rendered: Path, prepared: Path, base_model: Path, tuned: Path | None,
        out: Path, tracking: Tracking | None) -> dict[str, Any]:
    """Generate, score and report; return the metrics dict written to ``metrics.json``."""
    from pipeline import scoring
    from pipeline.generation import generate
    from pipeline.models import load_causal_lm, load_finetuned, load_tokenizer, model_kind

    ev = cfg.eval
    if "tuned" in ev.models and (tuned is None or not tuned.is_dir()):
        raise FileNotFoundError(f"evaluate: eval.models includes 'tuned' but there is no tuned model at {tuned}; "
                                "train first, or set eval.models=[base] for a zero-shot baseline")
    template_hash = check_template(rendered, tuned if "tuned" in ev.models else None)
    rows = select_rows(read_jsonl(rendered / "test.jsonl"), ev.max_examples)
    task_types = resolve_task_types(rows, ev.task_types)
    references = {ex["id"]: ex["output"] for ex in read_jsonl(prepared / "test.jsonl")}
    labels = label_sets(prepared, ev.task_types)
    tokenizer = load_tokenizer(base_model)
    budgets = [ev.max_new_tokens[task_types[r["task"]]] for r in rows]
    idx = {t: [i for i, r in enumerate(rows) if r["task"] == t] for t in sorted(task_types)}
    indices = scoring.task_indices({t: len(v) for t, v in idx.items()}, ev.bootstrap.n_resamples, ev.bootstrap.seed)

    predictions: dict[str, list[str]] = {}
    scores: dict[str, scoring.ModelScores] = {}
    classifier = model_kind(base_model) == "sequence_classification"
    for name in ev.models:
        if classifier:  # config validation allows only the tuned encoder: its base has no trained head
            predictions[name], nll = classify(tuned, rows, tokenizer.pad_token_id, ev.batch_size)  # type: ignore[arg-type]
        else:
            model = load_causal_lm(base_model) if name == "base" else load_finetuned(base_model, tuned)  # type: ignore[arg-type]
            predictions[name] = generate(model, tokenizer, [_prompt_ids(r) for r in rows], budgets, ev.batch_size,
                                         ev.stop_strings, desc=f"evaluate {name}")
            nll = reference_nll(model, rows, tokenizer.pad_token_id, ev.batch_size)
            del model
        outputs = {t: scoring.TaskOutputs(task_types[t], [references[rows[i]["id"]] for i in ii],
                                          [predictions[name][i] for i in ii], labels.get(t),
                                          [nll[i][0] for i in ii], [nll[i][1] for i in ii])
                   for t, ii in idx.items()}
        scores[name] = scoring.score_model(outputs, indices)
    deltas = scoring.compare(scores["base"], scores["tuned"]) if {"base", "tuned"} <= set(scores) else None

    metrics = scoring.metrics_json(scores, deltas)
    pred_rows = _prediction_rows(rows, references, predictions, scores, idx)
    _write(out, metrics, {**scoring.intervals_json(scores, deltas), "template_hash": template_hash,
                          "examples": len(rows), "task_types": task_types}, pred_rows)
    _plots(out, scores, task_types, references, rows, idx)
    report = scoring.markdown(scores, deltas, task_types)
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    if tracking is not None:
        _log_mlflow(tracking, cfg, tuned, rendered, template_hash, metrics, pred_rows, out)
    return metrics


def _prediction_rows(rows: list[dict[str, Any]], references: dict[str, str], predictions: dict[str, list[str]],
                     scores: dict[str, Any], idx: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One row per example: prompt, reference, each model's answer, its label and its scores."""
    position = {i: (t, k) for t, ii in idx.items() for k, i in enumerate(ii)}
    out = []
    for i, r in enumerate(rows):
        task, k = position[i]
        row = {"id": r["id"], "task": r["task"], "prompt": r["prompt"], "reference": references[r["id"]]}
        for name, ms in scores.items():
            row[f"{name}_prediction"] = predictions[name][i]
            if ms.tasks[task].labels:  # classification: the label the answer was mapped to (or <unmatched>)
                row[f"{name}_label"] = ms.tasks[task].labels[k]
            row[f"{name}_scores"] = ms.tasks[task].per_example[k]
        out.append(row)
    return out


def _write(out: Path, metrics: dict, intervals: dict, pred_rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_json(out / "intervals.json", intervals)
    write_jsonl(out / "predictions.jsonl", pred_rows)


def _plots(out: Path, scores: dict, task_types: dict[str, str], references: dict[str, str],
           rows: list[dict[str, Any]], idx: dict[str, list[int]]) -> None:
    """PNGs for people, and the same data as files ``dvc plots show`` renders."""
    from pipeline import plots, scoring

    for sub in ("plots", "confusion"):  # a task that is gone must not leave its plot behind
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    bars = scoring.bar_rows(scores, task_types)
    write_json(out / "per_task.json", bars)
    plots.task_bars({m: {b["task"]: (b["score"], b["low"], b["high"]) for b in bars if b["model"] == m}
                     for m in scores}, {t: scoring.PRIMARY[tt] for t, tt in task_types.items()},
                    out / "plots" / "per_task.png")
    for name, ms in scores.items():
        for t, s in ms.tasks.items():
            if s.confusion is None:
                continue
            refs = [references[rows[i]["id"]] for i in idx[t]]
            write_json(out / "confusion" / f"{t}_{name}.json", scoring.confusion_rows(refs, s.labels))
            if name == ("tuned" if "tuned" in scores else "base"):
                plots.confusion(s.confusion["matrix"], s.confusion["labels"], f"{t} ({name})",
                                out / "plots" / f"confusion_{t}.png")


def _log_mlflow(tracking: Tracking, cfg: config.PipelineConfig, tuned: Path | None, rendered: Path,
                template_hash: str, metrics: dict, pred_rows: list, out: Path) -> None:
    """Log into the training run, or into a new run tagged as a zero-shot baseline."""
    import mlflow
    import pandas as pd

    from pipeline import tracking as mlf

    run_file = tuned / "run.json" if tuned is not None else None
    if "tuned" in cfg.eval.models and run_file is not None and run_file.exists():
        run_id = read_json(run_file)["run_id"]
    else:
        tags = {**mlf.run_tags(tracking.repo_root, hash_files([rendered / "test.jsonl"]), template_hash,
                               tracking.dvc_exp_name), "eval.baseline": "zero-shot"}
        params = {k: config.to_dict(getattr(cfg, k)) for k in ("model", "data", "prompt", "eval", "seed")}
        run_id = mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root, params, tags,
                               run_name=f"zero-shot-{cfg.model.name}")
    flat = {f"eval.{k}": float(v) for k, v in config.flatten(metrics).items() if isinstance(v, (int, float))}
    table = pd.DataFrame([{**{k: v for k, v in r.items() if not k.endswith("_scores")},
                           **{f"{k}.{s}": x for k in r if k.endswith("_scores") for s, x in r[k].items()}}
                          for r in pred_rows])
    with mlf.active_run(tracking.uri, run_id):
        mlflow.log_metrics(flat)
        mlflow.log_table(table, artifact_file="eval/predictions.json")
        mlflow.log_artifacts(str(out), artifact_path="eval")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rendered", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, default=None, help="train stage output; not needed for eval.models=[base]")
    parser.add_argument("--out", type=Path, required=True, help="directory for metrics, predictions, plots")
    args = parser.parse_args(argv)
    from pipeline.tracking import default_uri

    root = Path.cwd()
    tracking = Tracking(default_uri(root), root / "mlartifacts", root, os.environ.get("DVC_EXP_NAME"))
    try:
        cfg = config.load(args.params)
        run(cfg, args.rendered, args.prepared, args.base_model, args.tuned, args.out, tracking)
    except (TemplateMismatch, config.ConfigError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("evaluate", main))

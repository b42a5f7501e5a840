"""Stage 5, evaluate: generate on the test split with the base and tuned models, score, compare.

Reads ``eval`` (and ``tracking``) from params.yaml. Refuses to run when the prompt
template the model was trained with differs from the one that rendered the test
prompts. Writes to ``--out``: ``metrics.json`` (DVC metrics: per task and overall, for
each model and the tuned-minus-base delta), ``intervals.json`` (95% bootstrap intervals,
paired-bootstrap deltas and p-values), ``predictions.jsonl``, ``report.md`` and PNG plots;
logs the same into the training run in MLflow.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import config
from pipeline.files import read_json, read_jsonl, write_json, write_jsonl
from pipeline.models import IGNORE_INDEX

# The score each task type is summarised by (bars, deltas, the overall mean).
PRIMARY = {"classification": "accuracy", "short_answer": "exact_match", "free_text": "rougeL"}


class TemplateMismatch(RuntimeError):
    """The evaluation prompts were rendered with another template than the model's."""


def check_template(rendered: Path, tuned: Path) -> str:
    """Return the template hash; raise if the tuned model was trained with a different one."""
    rendered_hash = read_json(rendered / "template.json")["hash"]
    trained = tuned / "template.json"
    if trained.exists() and read_json(trained)["hash"] != rendered_hash:
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


def label_sets(prepared: Path) -> dict[str, list[str]]:
    """Label set of each classification task: every reference seen in train and test."""
    labels: dict[str, set[str]] = defaultdict(set)
    for split in ("train", "test"):
        for ex in read_jsonl(prepared / f"{split}.jsonl"):
            if ex["task_type"] == "classification":
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


def score_task(task_type: str, refs: list[str], preds: list[str], labels: list[str] | None,
               nll: list[tuple[float, int]], n_resamples: int, seed: int) -> tuple[dict[str, Any], dict[str, Any],
                                                                                list[dict[str, float]]]:
    """Corpus metrics, their bootstrap intervals, and per-example scores for one task."""
    from pipeline import metrics as M

    per_example = [M.per_example_scores(task_type, r, p, labels) for r, p in zip(refs, preds)]
    corpus = M.corpus_scores(task_type, refs, preds, labels)
    values = {k: float(v) for k, v in corpus.items() if isinstance(v, (int, float))}
    values["perplexity"] = math.exp(sum(s for s, _ in nll) / max(sum(n for _, n in nll), 1))
    intervals: dict[str, Any] = {}
    for key in per_example[0] if per_example else []:
        name = {"correct": "accuracy", "unmatched": "unmatched_rate"}.get(key, key)
        _, low, high = M.bootstrap_ci([s[key] for s in per_example], n_resamples=n_resamples, seed=seed)
        intervals[name] = [low, high]
    if task_type == "classification" and labels:
        extracted = [M.extract_label(p, labels) for p in preds]
        _, low, high = M.bootstrap_metric(
            refs, extracted, lambda r, p: M.classification_scores(r, p, labels)["macro_f1"],
            n_resamples=n_resamples, seed=seed)
        intervals["macro_f1"] = [low, high]
        values["confusion"] = corpus["confusion"]  # type: ignore[assignment]
        values["per_class"] = corpus["per_class"]  # type: ignore[assignment]
    return values, intervals, per_example


def _primary_values(task_type: str, per_example: list[dict[str, float]]) -> list[float]:
    key = "correct" if task_type == "classification" else PRIMARY[task_type]
    return [s[key] for s in per_example]


def run(cfg: config.PipelineConfig, rendered: Path, prepared: Path, base_model: Path, tuned: Path,
        out: Path, tracking_uri: str | None) -> dict[str, Any]:
    """Generate, score and report; return the metrics dict written to ``metrics.json``."""
    from pipeline import metrics as M
    from pipeline import plots
    from pipeline.generation import generate
    from pipeline.models import load_causal_lm, load_finetuned, load_tokenizer

    ev = cfg.eval
    template_hash = check_template(rendered, tuned)
    rows = select_rows(read_jsonl(rendered / "test.jsonl"), ev.max_examples)
    references = {ex["id"]: ex["output"] for ex in read_jsonl(prepared / "test.jsonl")}
    labels = label_sets(prepared)
    tokenizer = load_tokenizer(base_model)
    prompt_ids = [r["input_ids"][: r["labels"].index(next(t for t in r["labels"] if t != IGNORE_INDEX))]
                  for r in rows]
    budgets = [ev.max_new_tokens[r["task_type"]] for r in rows]

    predictions: dict[str, list[str]] = {}
    nlls: dict[str, list[tuple[float, int]]] = {}
    for name in ev.models:
        model = load_causal_lm(base_model) if name == "base" else load_finetuned(base_model, tuned)
        predictions[name] = generate(model, tokenizer, prompt_ids, budgets, ev.batch_size, ev.stop_strings,
                                     desc=f"evaluate {name}")
        nlls[name] = reference_nll(model, rows, tokenizer.pad_token_id, ev.batch_size)
        del model

    tasks = sorted({r["task"] for r in rows})
    task_type = {r["task"]: r["task_type"] for r in rows}
    idx = {t: [i for i, r in enumerate(rows) if r["task"] == t] for t in tasks}
    metrics: dict[str, Any] = {m: {} for m in ev.models}
    intervals: dict[str, Any] = {m: {} for m in ev.models}
    per_example: dict[str, dict[str, list[dict[str, float]]]] = {m: {} for m in ev.models}
    n_boot, seed = ev.bootstrap.n_resamples, ev.bootstrap.seed
    for name in ev.models:
        for t in tasks:
            refs = [references[rows[i]["id"]] for i in idx[t]]
            preds = [predictions[name][i] for i in idx[t]]
            values, ci, scores = score_task(task_type[t], refs, preds, labels.get(t), [nlls[name][i] for i in idx[t]],
                                            n_boot, seed)
            metrics[name][t] = values
            intervals[name][t] = ci
            per_example[name][t] = scores
        metrics[name]["overall"] = {"score": float(np.mean([metrics[name][t][PRIMARY[task_type[t]]] for t in tasks]))}

    if "base" in ev.models and "tuned" in ev.models:
        metrics["delta"], intervals["delta"] = {}, {}
        for t in tasks:
            primary = PRIMARY[task_type[t]]
            metrics["delta"][t] = {k: metrics["tuned"][t][k] - metrics["base"][t][k]
                                   for k, v in metrics["tuned"][t].items() if isinstance(v, float)}
            intervals["delta"][t] = {primary: M.paired_bootstrap(
                _primary_values(task_type[t], per_example["base"][t]),
                _primary_values(task_type[t], per_example["tuned"][t]), n_resamples=n_boot, seed=seed)}
        metrics["delta"]["overall"] = {"score": metrics["tuned"]["overall"]["score"] - metrics["base"]["overall"]["score"]}

    out.mkdir(parents=True, exist_ok=True)
    confusions = {m: {t: metrics[m][t].pop("confusion") for t in tasks if "confusion" in metrics[m][t]}
                  for m in ev.models}
    per_class = {m: {t: metrics[m][t].pop("per_class") for t in tasks if "per_class" in metrics[m][t]}
                 for m in ev.models}
    write_json(out / "metrics.json", metrics)
    write_json(out / "intervals.json", {"intervals": intervals, "per_class": per_class, "confusion": confusions,
                                        "template_hash": template_hash, "examples": len(rows)})
    pred_rows = []
    for i, r in enumerate(rows):
        row = {"id": r["id"], "task": r["task"], "prompt": r["prompt"], "reference": references[r["id"]]}
        pos = idx[r["task"]].index(i)
        for name in ev.models:
            row[f"{name}_prediction"] = predictions[name][i]
            row[f"{name}_scores"] = per_example[name][r["task"]][pos]
        pred_rows.append(row)
    write_jsonl(out / "predictions.jsonl", pred_rows)
    _plots(plots, metrics, intervals, confusions, task_type, tasks, out)
    report = _markdown(metrics, intervals, tasks, task_type, ev.models)
    (out / "report.md").write_text(report)
    print(report)
    if tracking_uri:
        _log_mlflow(tracking_uri, cfg.tracking.experiment, tuned, metrics, pred_rows, out)
    return metrics


def _plots(plots: Any, metrics: dict, intervals: dict, confusions: dict, task_type: dict, tasks: list, out: Path) -> None:
    models = [m for m in metrics if m != "delta"]
    bars = {m: {t: (metrics[m][t][PRIMARY[task_type[t]]], *intervals[m][t][PRIMARY[task_type[t]]]) for t in tasks}
            for m in models}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots.task_bars(bars, {t: PRIMARY[task_type[t]] for t in tasks}, out / "plots" / "per_task.png")
    model = "tuned" if "tuned" in confusions else models[0]
    for t, conf in confusions[model].items():
        plots.confusion(conf["matrix"], conf["labels"], f"{t} ({model})", out / "plots" / f"confusion_{t}.png")


def _markdown(metrics: dict, intervals: dict, tasks: list, task_type: dict, models: Sequence[str]) -> str:
    lines = ["| task | metric | " + " | ".join(models) + (" | delta (95% CI, p) |" if "delta" in metrics else " |"),
             "|---|---|" + "---|" * len(models) + ("---|" if "delta" in metrics else "")]
    for t in tasks:
        primary = PRIMARY[task_type[t]]
        for key in (primary, "perplexity"):
            cells = []
            for m in models:
                ci = intervals[m][t].get(key)
                cells.append(f"{metrics[m][t][key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            delta = ""
            if "delta" in metrics:
                d = intervals["delta"][t].get(key)
                delta = (f" | {d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], p={d['p_value']:.3f}" if d
                         else f" | {metrics['delta'][t][key]:+.3f}")
            lines.append(f"| {t} | {key} | " + " | ".join(cells) + delta + " |")
    return "\n".join(lines) + "\n"


def _log_mlflow(uri: str, experiment: str, tuned: Path, metrics: dict, pred_rows: list, out: Path) -> None:
    """Log into the training run (or a new run for a base-only evaluation)."""
    import mlflow
    import pandas as pd

    from pipeline.config import flatten
    from pipeline.tracking import active_run

    run_file = tuned / "run.json"
    mlflow.set_tracking_uri(uri)
    if run_file.exists():
        run_id = read_json(run_file)["run_id"]
    else:
        mlflow.set_experiment(experiment)
        run_id = mlflow.start_run(run_name="eval-base-only").info.run_id
        mlflow.end_run()
    flat = {f"eval.{k}": float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    table = pd.DataFrame([{**{k: v for k, v in r.items() if not k.endswith("_scores")},
                           **{f"{k}.{s}": x for k in r if k.endswith("_scores") for s, x in r[k].items()}}
                          for r in pred_rows])
    with active_run(uri, run_id):
        mlflow.log_metrics(flat)
        mlflow.log_table(table, artifact_file="eval/predictions.json")
        mlflow.log_artifacts(str(out), artifact_path="eval")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rendered", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for metrics, predictions, plots")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    from pipeline.tracking import default_uri

    try:
        run(cfg, args.rendered, args.prepared, args.base_model, args.tuned, args.out, default_uri(Path.cwd()))
    except TemplateMismatch as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

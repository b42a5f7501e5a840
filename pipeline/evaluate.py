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
scored by the same code: the whole pipeline's (``model.kind=sequence_classification``), or the
``encoder`` arm that train_encoder trained beside the causal LM (``--encoder``), scored on the
same test rows of the classification tasks, with its paired difference to ``tuned``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.core import config
from pipeline.data import safety
from pipeline.core.files import hash_files, read_json, read_jsonl, write_json, write_jsonl
from pipeline.core.models import IGNORE_INDEX
from pipeline.tracking.runs import Tracking
from pipeline.core.errors import TemplateMismatch


# The checkout this module belongs to: where the default safety lists are found when the
# working directory (a DVC repo root) does not have them.
PROJECT = Path(__file__).resolve().parents[1]


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

    from pipeline.core.models import completion_loss
    from pipeline.training.module import collate

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
    from pipeline.training import encoder

    labels = read_json(tuned / encoder.LABELS_FILE)
    preds, nll = encoder.predict(encoder.load_classifier(tuned / "model"), rows, labels, pad_id, batch_size)
    return [labels["labels"][i] for i in preds], [(x, 1) for x in nll]


def _prompt_ids(row: dict[str, Any]) -> list[int]:
    """The prompt part of a rendered row: every token before the first loss-bearing one."""
    first = next(i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX)
    return row["input_ids"][:first]


def arm_rows(rendered: Path, models: Sequence[str], max_examples: int | None) -> dict[str, list[dict[str, Any]]]:
    """Each arm's rendered test rows, aligned by id: base/tuned read ``test.jsonl``, base_kshot ``test_kshot.jsonl``.

    A row the k-shot rendering dropped (``prompt.overflow: drop``) is left out of every arm,
    so the arms are always compared on the same examples.
    """
    rows = select_rows(read_jsonl(rendered / "test.jsonl"), max_examples)
    if "base_kshot" not in models:
        return {m: rows for m in models}
    path = rendered / "test_kshot.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"evaluate: eval.models includes 'base_kshot' but {path} does not exist; "
                                "render with prompt.eval_k_shot >= 1")
    kshot = {r["id"]: r for r in read_jsonl(path)}
    rows = [r for r in rows if r["id"] in kshot]
    return {m: [kshot[r["id"]] for r in rows] if m == "base_kshot" else rows for m in models}


def encoder_arm(encoder_dir: Path | None, rows: list[dict[str, Any]], examples: Mapping[str, dict[str, Any]],
                task_types: Mapping[str, str], batch_size: int) -> tuple[dict[str, str], dict[str, float]] | str:
    """The encoder arm's label and reference-label NLL for every test row of the tasks it was trained on,
    by id: the same rows (and order) the other arms scored. A string is the reason the arm is skipped."""
    from pipeline.training import encoder
    from pipeline.core.models import load_tokenizer

    if encoder_dir is None:
        return "no --encoder folder given"
    if (encoder_dir / encoder.SKIPPED_FILE).exists():
        return read_json(encoder_dir / encoder.SKIPPED_FILE)["reason"]
    if not (encoder_dir / encoder.LABELS_FILE).exists():
        raise FileNotFoundError(f"evaluate: {encoder_dir} holds neither a trained encoder ({encoder.LABELS_FILE}) "
                                f"nor {encoder.SKIPPED_FILE}; run train_encoder first")
    text = read_json(encoder_dir / "template.json")
    labels = read_json(encoder_dir / encoder.LABELS_FILE)
    tasks = {t for t in labels["tasks"] if task_types.get(t) == "classification"}
    chosen = [examples[r["id"]] for r in rows if r["task"] in tasks]
    tokenizer = load_tokenizer(encoder_dir / "model")
    enc_rows, _ = encoder.render_rows(chosen, labels, tokenizer, text["include_instruction"], text["max_length"])
    if [r["id"] for r in enc_rows] != [ex["id"] for ex in chosen]:
        raise ValueError(f"evaluate: the encoder in {encoder_dir} reads only rows the data types 'classification', "
                         f"but eval.task_types makes other rows of {sorted(tasks)} classification too")
    preds, nll = classify(encoder_dir, enc_rows, tokenizer.pad_token_id, batch_size)  # type: ignore[arg-type]
    ids = [r["id"] for r in enc_rows]
    return dict(zip(ids, preds)), {i: x for i, (x, _) in zip(ids, nll)}


def run(cfg: config.PipelineConfig, rendered: Path, prepared: Path, base_model: Path, tuned: Path | None,
        out: Path, tracking: Tracking | None, rules: Any = None, encoder_dir: Path | None = None) -> dict[str, Any]:
    """Generate, score and report; return the metrics dict written to ``metrics.json``.

    ``rules`` (a :class:`pipeline.data.safety.Rules`) reviews every arm's outputs; ``None`` skips the review.
    ``encoder_dir`` is train_encoder's output: the ``encoder`` arm, when ``eval.models`` lists it.
    """
    from pipeline.evaluation import scoring
    from pipeline.evaluation import slices
    from pipeline.evaluation.generation import generate
    from pipeline.core.models import load_causal_lm, load_finetuned, load_tokenizer, model_kind

    ev = cfg.eval
    if "tuned" in ev.models and (tuned is None or not tuned.is_dir()):
        raise FileNotFoundError(f"evaluate: eval.models includes 'tuned' but there is no tuned model at {tuned}; "
                                "train first, or set eval.models=[base] for a zero-shot baseline")
    # The guard is about the tuned arm: the k-shot arm's template differs from training by design.
    template_hash = check_template(rendered, tuned if "tuned" in ev.models else None)
    llm_arms = [m for m in ev.models if m != "encoder"]
    if not llm_arms:
        raise config.ConfigError(["eval.models: the encoder arm is scored beside a causal LM arm; "
                                  "list one of base, base_kshot, tuned too"], "eval.models")
    arms = arm_rows(rendered, llm_arms, ev.max_examples)
    rows = arms[llm_arms[0]]
    task_types = resolve_task_types(rows, ev.task_types)
    examples = {ex["id"]: ex for ex in read_jsonl(prepared / "test.jsonl")}
    references = {i: ex["output"] for i, ex in examples.items()}
    labels = label_sets(prepared, ev.task_types)
    tokenizer = load_tokenizer(base_model)
    budgets = [ev.max_new_tokens[task_types[r["task"]]] for r in rows]
    idx = {t: [i for i, r in enumerate(rows) if r["task"] == t] for t in sorted(task_types)}
    indices = scoring.task_indices({t: len(v) for t, v in idx.items()}, ev.bootstrap.n_resamples, ev.bootstrap.seed)

    predictions: dict[str, list[str]] = {}
    outputs: dict[str, dict[str, scoring.TaskOutputs]] = {}

    def task_outputs(preds: Sequence[Any], nll: Sequence[Any], tasks: Sequence[str]) -> dict[str, scoring.TaskOutputs]:
        """One arm's answers and reference NLLs (both by row of ``rows``) for each of ``tasks``."""
        return {t: scoring.TaskOutputs(task_types[t], [references[rows[i]["id"]] for i in idx[t]],
                                       [preds[i] for i in idx[t]], labels.get(t),
                                       [nll[i][0] for i in idx[t]], [nll[i][1] for i in idx[t]])
                for t in tasks}

    classifier = model_kind(base_model) == "sequence_classification"
    base_lm = None  # loaded once for the base and base_kshot arms
    for name in llm_arms:
        if classifier:  # config validation allows only the tuned encoder: its base has no trained head
            predictions[name], nll = classify(tuned, arms[name], tokenizer.pad_token_id, ev.batch_size)  # type: ignore[arg-type]
        else:
            if name == "tuned":
                base_lm = None  # one model in memory at a time
                model = load_finetuned(base_model, tuned)  # type: ignore[arg-type]
            else:
                base_lm = base_lm if base_lm is not None else load_causal_lm(base_model)
                model = base_lm
            predictions[name] = generate(model, tokenizer, [_prompt_ids(r) for r in arms[name]], budgets,
                                         ev.batch_size, ev.stop_strings, desc=f"evaluate {name}",
                                         decode_batch_size=ev.decode_batch_size)
            nll = reference_nll(model, arms[name], tokenizer.pad_token_id, ev.batch_size)
            del model
        outputs[name] = task_outputs(predictions[name], nll, list(idx))
    encoder_note = ""
    if "encoder" in ev.models:
        arm = encoder_arm(encoder_dir, rows, examples, task_types, ev.batch_size)
        if isinstance(arm, str):
            encoder_note = f"\nEncoder arm: skipped ({arm}).\n"
            print(f"evaluate: encoder arm skipped: {arm}", flush=True)
        else:
            by_id, enc_nll = arm
            # A full-length column (None off its tasks), so prediction rows line up with the other arms.
            predictions["encoder"] = [by_id.get(r["id"]) for r in rows]  # type: ignore[misc]
            outputs["encoder"] = task_outputs(predictions["encoder"],
                                              [(enc_nll[r["id"]], 1) if r["id"] in by_id else None for r in rows],
                                              [t for t, ii in idx.items() if ii and rows[ii[0]]["id"] in by_id])
    scores = {name: scoring.score_model(o, {t: indices[t] for t in o}) for name, o in outputs.items()}
    deltas = scoring.compare_arms(scores)
    llm_outputs = {name: o for name, o in outputs.items() if name != "encoder"}

    # The encoder answers with one of its labels: nothing for the safety rules to review.
    flags = ({name: [rules.check(p) for p in preds] for name, preds in predictions.items() if name != "encoder"}
             if rules else {})
    safety_rates = {name: safety.flag_rate(f, ev.bootstrap.n_resamples, ev.bootstrap.seed) for name, f in flags.items()}
    slice_values = [{k: slices.slice_value(examples[r["id"]], k, ev.length_buckets) for k in ev.slices} for r in rows]
    slice_table = slices.score_slices(ev.slices, slice_values, llm_outputs, [r["task"] for r in rows],
                                      ev.bootstrap.n_resamples, ev.bootstrap.seed)

    metrics = scoring.metrics_json(scores, deltas)
    if safety_rates:
        metrics["safety"] = {name: {"flagged_rate": r["rate"], "flagged": r["flagged"]} for name, r in safety_rates.items()}
    pred_rows = _prediction_rows(rows, references, predictions, scores, idx, arms, flags)
    _write(out, metrics, {**scoring.intervals_json(scores, deltas), "template_hash": template_hash,
                          "examples": len(rows), "task_types": task_types, "safety": safety_rates,
                          "slices": {"rows": slice_table.rows, "gaps": slice_table.gaps,
                                     "largest_gap": slice_table.largest_gap()}}, pred_rows)
    _plots(out, scores, task_types, references, rows, idx, slice_table)
    report = (scoring.markdown(scores, deltas, task_types) + encoder_note + _safety_markdown(safety_rates)
              + "\n## Slices\n\n" + slices.markdown(slice_table))
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    if tracking is not None:
        _log_mlflow(tracking, cfg, tuned, rendered, template_hash, metrics, pred_rows, out, prepared)
    return metrics


def _safety_markdown(rates: Mapping[str, dict[str, Any]]) -> str:
    if not rates:
        return ""
    lines = ["\n## Safety review of outputs\n", "| model | flagged | rate (95% CI) |", "|---|---|---|"]
    lines += [f"| {m} | {r['flagged']}/{r['n']} | {r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] |"
              for m, r in rates.items()]
    return "\n".join(lines) + "\n"


def _prediction_rows(rows: list[dict[str, Any]], references: dict[str, str], predictions: dict[str, list[str]],
                     scores: dict[str, Any], idx: dict[str, list[int]], arms: Mapping[str, list[dict[str, Any]]],
                     flags: Mapping[str, list[list[str]]]) -> list[dict[str, Any]]:
    """One row per example: prompt, reference, each model's answer, label, scores and safety flags."""
    position = {i: (t, k) for t, ii in idx.items() for k, i in enumerate(ii)}
    out = []
    for i, r in enumerate(rows):
        task, k = position[i]
        row = {"id": r["id"], "task": r["task"], "prompt": r["prompt"], "reference": references[r["id"]]}
        for name, ms in scores.items():
            if task not in ms.tasks:  # the encoder arm scores classification tasks only
                continue
            row[f"{name}_prediction"] = predictions[name][i]
            if ms.tasks[task].labels:  # classification: the label the answer was mapped to (or <unmatched>)
                row[f"{name}_label"] = ms.tasks[task].labels[k]
            row[f"{name}_scores"] = ms.tasks[task].per_example[k]
            if name in flags:
                row[f"{name}_flags"] = flags[name][i]
        if "base_kshot" in arms:  # the k-shot arm's prompt holds the exemplars, shown for review
            row["base_kshot_prompt"] = arms["base_kshot"][i]["prompt"]
        out.append(row)
    return out


def _write(out: Path, metrics: dict, intervals: dict, pred_rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_json(out / "intervals.json", intervals)
    write_jsonl(out / "predictions.jsonl", pred_rows)


def _plots(out: Path, scores: dict, task_types: dict[str, str], references: dict[str, str],
           rows: list[dict[str, Any]], idx: dict[str, list[int]], slice_table: Any) -> None:
    """PNGs for people, and the same data as files ``dvc plots show`` renders."""
    from pipeline.core import plots
    from pipeline.evaluation import scoring

    for sub in ("plots", "confusion"):  # a task that is gone must not leave its plot behind
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    overall = [{**r, "bar": f"{r['slice']}={r['value']} · {r['model']}"} for r in slice_table.rows
               if r["task"] == "overall"]
    write_json(out / "slices.json", overall)
    if overall:
        plots.task_bars({m: {f"{r['slice']}={r['value']}": (r["score"], r["low"], r["high"])
                             for r in overall if r["model"] == m} for m in scores},
                        {f"{r['slice']}={r['value']}": "overall score" for r in overall}, out / "plots" / "slices.png")
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
            elif name == "encoder":
                plots.confusion(s.confusion["matrix"], s.confusion["labels"], f"{t} (encoder)",
                                out / "plots" / f"confusion_{t}_encoder.png")


def _log_mlflow(tracking: Tracking, cfg: config.PipelineConfig, tuned: Path | None, rendered: Path,
                template_hash: str, metrics: dict, pred_rows: list, out: Path, prepared: Path) -> None:
    """Log into the training run, or into a new run tagged as a zero-shot baseline."""
    import mlflow
    import pandas as pd

    from pipeline.tracking import runs as mlf

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
        mlflow.log_table(pd.DataFrame(read_json(out / "intervals.json")["slices"]["rows"]),
                         artifact_file="eval/slice_table.json")
        mlflow.log_artifacts(str(out), artifact_path="eval")
        _log_prepare_safety(prepared)


def _log_prepare_safety(prepared: Path) -> None:
    """What prepare's safety filter quarantined, in the run that evaluates the model trained on the rest.

    (Train, not this stage, opens the run; logging here keeps the filter visible in MLflow.)
    """
    import mlflow

    path = prepared / "safety.json"
    if not path.exists():
        return
    counts = read_json(path)
    mlflow.log_metric("prepare.safety.quarantined", counts["quarantined"])
    # MLflow metric names allow only [\w\-. /]: a rule such as "keyword:pipe bomb" is spelt out safely.
    mlflow.log_metrics({"prepare.safety." + re.sub(r"[^\w\-. /]", "_", rule): n
                        for rule, n in counts["by_rule"].items()})
    mlflow.log_dict(counts, "prepare/safety.json")
    if (prepared / "quarantine.jsonl").exists():
        mlflow.log_artifact(str(prepared / "quarantine.jsonl"), artifact_path="prepare")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rendered", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, default=None, help="train stage output; not needed for eval.models=[base]")
    parser.add_argument("--encoder", type=Path, default=None,
                        help="train_encoder stage output: the encoder arm (skipped when absent or marked skipped)")
    parser.add_argument("--out", type=Path, required=True, help="directory for metrics, predictions, plots")
    args = parser.parse_args(argv)
    root = Path.cwd()
    tracking = Tracking.from_env(root)
    try:
        cfg = config.load(args.params)
        rules = safety.from_config(cfg.safety, [root, PROJECT])
        run(cfg, args.rendered, args.prepared, args.base_model, args.tuned, args.out, tracking, rules, args.encoder)
    except (TemplateMismatch, config.ConfigError, FileNotFoundError, safety.SafetyListError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("evaluate", main))

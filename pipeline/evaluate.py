"""Stage 5, evaluate: generate on the test split with the base and/or tuned model, score, compare.

Reads ``eval``, ``safety`` and ``tracking``. Refuses to run when the prompt
template the tuned model was trained with differs from the one that rendered the test
prompts. ``eval.models: [base]`` is a zero-shot baseline that needs no trained model
(``--tuned`` may then be left out) and gets its own MLflow run. Writes to ``--out``:
``headline.json`` (DVC's metrics: each arm's overall score and each task's primary metric, and
the paired differences with ``ci_low``, ``ci_high`` and ``p``), ``metrics.json`` (every metric, per
task and overall, for each model and each paired delta), ``intervals.json`` (95% intervals of every metric, exact for 0/1 metrics and
bootstrap otherwise, paired deltas with p-values, per-class scores, confusion matrices), ``predictions.jsonl``, ``report.md``,
PNG plots in ``plots/`` and DVC plot data (``per_task.json``, ``confusion/<task>_<model>.json``);
logs the same into MLflow. The ``encoder`` arm (``--encoder``, trained by train_encoder beside
the causal LM) answers with its argmax labels, scored by the same code on the same test rows
of the classification tasks, with its paired difference to ``tuned``.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.core import cli, config
from pipeline.core.errors import MissingInput, TemplateMismatch
from pipeline.core.files import atomic_dir, hash_files, read_json, read_jsonl, write_json, write_jsonl
from pipeline.core.models import IGNORE_INDEX
from pipeline.core.paths import search_roots
from pipeline.data import safety
from pipeline.tracking import stage_run, views
from pipeline.tracking.runs import Tracking


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
        raise MissingInput(f"evaluate: eval.models includes 'base_kshot' but {path} does not exist; "
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
        raise MissingInput(f"evaluate: {encoder_dir} holds neither a trained encoder ({encoder.LABELS_FILE}) "
                                f"nor {encoder.SKIPPED_FILE}; run train_encoder first")
    text = read_json(encoder_dir / "template.json")
    labels = read_json(encoder_dir / encoder.LABELS_FILE)
    tasks = {t for t in labels["tasks"] if task_types.get(t) == "classification"}
    chosen = [examples[r["id"]] for r in rows if r["task"] in tasks]
    tokenizer = load_tokenizer(encoder_dir / "model")
    enc_rows, _ = encoder.render_rows(chosen, labels, tokenizer, text["include_instruction"], text["max_length"])
    if [r["id"] for r in enc_rows] != [ex["id"] for ex in chosen]:
        raise config.ConfigError([f"eval.task_types: the encoder in {encoder_dir} reads only rows the data types "
                                  f"'classification', but this makes other rows of {sorted(tasks)} classification too"],
                                 "eval.task_types")
    preds, nll = classify(encoder_dir, enc_rows, tokenizer.pad_token_id, batch_size)  # type: ignore[arg-type]
    ids = [r["id"] for r in enc_rows]
    return dict(zip(ids, preds)), {i: x for i, (x, _) in zip(ids, nll)}


@dataclass(frozen=True)
class Paths:
    rendered: Path = cli.field("render stage output directory")
    prepared: Path = cli.field("prepare stage output directory (references, slices, labels)")
    base_model: Path = cli.field("base_model stage output")
    out: Path = cli.field("directory for metrics, predictions, plots")
    tuned: Path | None = cli.field("train stage output; not needed for eval.models=[base]", default=None)
    encoder: Path | None = cli.field("train_encoder stage output: the encoder arm (skipped when absent or marked "
                                     "skipped)", default=None)
    aligned: Path | None = cli.field("align stage output: the aligned arm (skipped when absent or marked skipped)",
                                     default=None)
    pairs: Path | None = cli.field("align stage's held-out pairs: the preference metric (with --aligned)",
                                   default=None)


@dataclass
class TestSet:
    """The rows every arm is scored on, aligned by position, with what scoring needs of them."""

    rows: list[dict[str, Any]]  # the first causal-LM arm's rows: ids, tasks, order
    arms: dict[str, list[dict[str, Any]]]  # each causal-LM arm's rendered rows (k-shot prompts differ)
    task_types: dict[str, str]
    examples: dict[str, dict[str, Any]]  # prepared test examples by id
    labels: dict[str, list[str]]  # label set of each classification task
    idx: dict[str, list[int]]  # each task's row positions
    preferences: dict[str, list[float]] = field(default_factory=dict)  # arm -> per held-out pair: prefers chosen

    def outputs(self, preds: Sequence[Any], nll: Sequence[Any], tasks: Sequence[str],
                loglik: Sequence[str | None] | None = None) -> dict[str, Any]:
        """One arm's answers, reference NLLs and (causal LMs) loglik labels, all by row position, as
        scoring's TaskOutputs per task."""
        from pipeline.evaluation import scoring

        return {t: scoring.TaskOutputs(self.task_types[t], [self.examples[self.rows[i]["id"]]["output"]
                                                            for i in self.idx[t]],
                                       [preds[i] for i in self.idx[t]], self.labels.get(t),
                                       [nll[i][0] for i in self.idx[t]], [nll[i][1] for i in self.idx[t]],
                                       [loglik[i] for i in self.idx[t]] if loglik and t in self.labels else None)
                for t in tasks}


def run(cfg: config.PipelineConfig, paths: Paths, tracking: Tracking | None) -> dict[str, Any]:
    """Generate, score and report into ``paths.out`` (atomically); return the metrics of ``metrics.json``.

    The ``safety`` rules review every causal-LM arm's outputs. With ``tracking``, the
    scores go into the training run of the tuned model (found by its digest), or into a new
    run for a zero-shot baseline; the run is open while evaluation works, and ends FAILED or
    KILLED if it does not finish.
    """
    stage_run.sigterm_outside(lambda: False)  # SIGTERM ends the reopened run KILLED and exits 143
    rules = safety.from_config(cfg.safety, search_roots())
    template_hash = check_inputs(cfg, paths)
    test = load_test_set(cfg, paths)
    client, run_id = _open_run(cfg, paths, tracking, template_hash) if tracking else (None, None)

    def terminate(status: str) -> None:
        if run_id is not None:
            from pipeline.tracking.runs import locked_write

            locked_write(tracking.uri, lambda: client.set_terminated(run_id, status))  # type: ignore[union-attr]

    with stage_run.closing(terminate):
        predictions, outputs = generate_arms(cfg, paths, test)
        encoder_note = add_encoder_arm(cfg, paths, test, predictions, outputs)
        metrics, pred_rows = report(cfg, paths.out, test, predictions, outputs, rules, template_hash, encoder_note)
        if run_id is not None:
            _log_mlflow(tracking, run_id, metrics, pred_rows, paths.out, paths.prepared,  # type: ignore[arg-type]
                        paths.rendered)
    return metrics


def check_inputs(cfg: config.PipelineConfig, paths: Paths) -> str:
    """Refuse what cannot be evaluated before any model loads; return the test prompts' template hash."""
    if "tuned" in cfg.eval.models and (paths.tuned is None or not paths.tuned.is_dir()):
        raise MissingInput(f"evaluate: eval.models includes 'tuned' but there is no tuned model at "
                                f"{paths.tuned}; train first, or set eval.models=[base] for a zero-shot baseline")
    if not [m for m in cfg.eval.models if m != "encoder"]:
        raise config.ConfigError(["eval.models: the encoder arm is scored beside a causal LM arm; "
                                  "list one of base, base_kshot, tuned too"], "eval.models")
    # The guard is about the tuned arm: the k-shot arm's template differs from training by design.
    return check_template(paths.rendered, paths.tuned if "tuned" in cfg.eval.models else None)


def load_test_set(cfg: config.PipelineConfig, paths: Paths) -> TestSet:
    """The test rows of every causal-LM arm, their task types, references and label sets."""
    ev = cfg.eval
    llm_arms = [m for m in ev.models if m != "encoder" and (m != "aligned" or has_aligned(paths))]
    arms = arm_rows(paths.rendered, llm_arms, ev.max_examples)
    rows = arms[llm_arms[0]]
    task_types = resolve_task_types(rows, ev.task_types)
    return TestSet(rows, arms, task_types, {ex["id"]: ex for ex in read_jsonl(paths.prepared / "test.jsonl")},
                   label_sets(paths.prepared, ev.task_types),
                   {t: [i for i, r in enumerate(rows) if r["task"] == t] for t in sorted(task_types)})


def generate_arms(cfg: config.PipelineConfig, paths: Paths,
                  test: TestSet) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """Each causal-LM arm's answers (greedy generation) and scoring inputs, one model in memory at a time."""
    from pipeline.core.models import load_causal_lm, load_finetuned, load_tokenizer
    from pipeline.evaluation.generation import generate

    ev = cfg.eval
    tokenizer = load_tokenizer(paths.base_model)
    budgets = [ev.max_new_tokens[test.task_types[r["task"]]] for r in test.rows]
    predictions: dict[str, list[Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    base_lm = None  # loaded once for the base and base_kshot arms
    for name, rows in test.arms.items():
        if name in ("tuned", "aligned"):
            base_lm = None  # one model in memory at a time
            model = load_finetuned(paths.base_model, paths.tuned if name == "tuned" else paths.aligned)  # type: ignore[arg-type]
        else:
            base_lm = base_lm if base_lm is not None else load_causal_lm(paths.base_model)
            model = base_lm
        predictions[name] = generate(model, tokenizer, [_prompt_ids(r) for r in rows], budgets, ev.batch_size,
                                     ev.stop_strings, desc=f"evaluate {name}", decode_batch_size=ev.decode_batch_size)
        nll = reference_nll(model, rows, tokenizer.pad_token_id, ev.batch_size)
        by_loglik = loglik_labels(model, tokenizer, rows, test, ev.batch_size, name)
        if name in ("tuned", "aligned") and has_aligned(paths):
            test.preferences[name] = preference_scores(model, paths.pairs, tokenizer.pad_token_id,  # type: ignore[arg-type]
                                                       ev.batch_size)
        del model
        outputs[name] = test.outputs(predictions[name], nll, list(test.idx), by_loglik)
    return predictions, outputs


def has_aligned(paths: Paths) -> bool:
    """Whether the align stage trained a model (not only its skip marker): then there is an aligned arm."""
    return paths.aligned is not None and paths.aligned.is_dir() and not (paths.aligned / "skipped.json").exists()


def preference_scores(model: Any, pairs: Path, pad_id: int, batch_size: int) -> list[float]:
    """Per held-out pair of the align stage, 1.0 when ``model`` gives chosen the higher log-prob."""
    from pipeline.training.dpo import preference_accuracy

    if not (pairs / "test.jsonl").exists():
        raise MissingInput(f"evaluate: the aligned arm needs the align stage's held-out pairs in {pairs}/test.jsonl")
    return preference_accuracy(model, read_jsonl(pairs / "test.jsonl"), pad_id, batch_size)


def loglik_labels(model: Any, tokenizer: Any, rows: list[dict[str, Any]], test: "TestSet", batch_size: int,
                  name: str) -> list[str | None]:
    """Each classification row's most likely label (:mod:`pipeline.evaluation.loglik`); None elsewhere.
    Its time goes to stdout: the cost beside generation."""
    import time

    from pipeline.evaluation import loglik

    chosen = [i for i, r in enumerate(rows) if r["task"] in test.labels]
    start = time.perf_counter()
    picked = loglik.classify(model, tokenizer, [rows[i] for i in chosen],
                             [test.examples[rows[i]["id"]]["output"] for i in chosen],
                             [test.labels[rows[i]["task"]] for i in chosen], [_prompt_ids(rows[i]) for i in chosen],
                             batch_size)
    pairs = sum(len(test.labels[rows[i]["task"]]) for i in chosen)
    print(f"evaluate {name}: loglik scoring of {len(chosen)} rows x labels ({pairs} prompt+label rows) "
          f"took {time.perf_counter() - start:.2f}s", flush=True)
    out: list[str | None] = [None] * len(rows)
    for i, label in zip(chosen, picked):
        out[i] = label
    return out


def add_encoder_arm(cfg: config.PipelineConfig, paths: Paths, test: TestSet, predictions: dict[str, list[Any]],
                    outputs: dict[str, dict[str, Any]]) -> str:
    """Score the encoder arm into ``predictions``/``outputs`` when ``eval.models`` lists it; return the
    report's note when it is skipped (else an empty string)."""
    if "encoder" not in cfg.eval.models:
        return ""
    arm = encoder_arm(paths.encoder, test.rows, test.examples, test.task_types, cfg.eval.batch_size)
    if isinstance(arm, str):
        print(f"evaluate: encoder arm skipped: {arm}", flush=True)
        return f"\nEncoder arm: skipped ({arm}).\n"
    by_id, enc_nll = arm
    rows = test.rows
    # A full-length column (None off its tasks), so prediction rows line up with the other arms.
    predictions["encoder"] = [by_id.get(r["id"]) for r in rows]
    outputs["encoder"] = test.outputs(predictions["encoder"],
                                      [(enc_nll[r["id"]], 1) if r["id"] in by_id else None for r in rows],
                                      [t for t, ii in test.idx.items() if ii and rows[ii[0]]["id"] in by_id])
    return ""


def report(cfg: config.PipelineConfig, out: Path, test: TestSet, predictions: dict[str, list[Any]],
           outputs: dict[str, dict[str, Any]], rules: Any, template_hash: str,
           encoder_note: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every arm, compare them, review outputs and slices; write ``out`` atomically."""
    from pipeline.evaluation import preference as prefer
    from pipeline.evaluation import scoring, slices

    ev, rows = cfg.eval, test.rows
    indices = scoring.task_indices({t: len(v) for t, v in test.idx.items()}, ev.bootstrap.n_resamples,
                                   ev.bootstrap.seed)
    scores = {name: scoring.score_model(o, {t: indices[t] for t in o}) for name, o in outputs.items()}
    deltas = scoring.compare_arms(scores)
    # The encoder answers with one of its labels: nothing for the safety rules to review.
    flags = {name: [rules.check(p) for p in preds] for name, preds in predictions.items() if name != "encoder"}
    safety_rates = {name: safety.flag_rate(f) for name, f in flags.items()}
    slice_values = [{k: slices.slice_value(test.examples[r["id"]], k, ev.length_buckets) for k in ev.slices}
                    for r in rows]
    slice_table = slices.score_slices(ev.slices, slice_values, {n: o for n, o in outputs.items() if n != "encoder"},
                                      [r["task"] for r in rows], ev.bootstrap.n_resamples, ev.bootstrap.seed)
    metrics = scoring.metrics_json(scores, deltas)
    preference, preference_ci = prefer.report(test.preferences)
    if preference:
        metrics["preference"] = preference
    if safety_rates:
        metrics["safety"] = {name: {"flagged_rate": r["rate"], "flagged": r["flagged"]} for name, r in safety_rates.items()}
    references = {i: ex["output"] for i, ex in test.examples.items()}
    pred_rows = _prediction_rows(rows, references, predictions, scores, test.idx, test.arms, flags)
    text = (scoring.markdown(scores, deltas, test.task_types) + encoder_note + prefer.markdown(preference_ci)
            + _safety_markdown(safety_rates)
            + "\n## Slices\n\n" + slices.markdown(slice_table))
    with atomic_dir(out) as tmp:
        _write(tmp, metrics, {**scoring.headline_json(scores, deltas),
                              **({"preference": prefer.headline(preference_ci)} if preference else {})},
               {**scoring.intervals_json(scores, deltas), **({"preference": preference_ci} if preference else {}),
                "template_hash": template_hash, "examples": len(rows), "task_types": test.task_types,
                "safety": safety_rates, "slices": {"rows": slice_table.rows, "gaps": slice_table.gaps,
                                                   "largest_gap": slice_table.largest_gap()}}, pred_rows)
        _plots(tmp, scores, test.task_types, references, rows, test.idx, slice_table)
        (tmp / "report.md").write_text(text, encoding="utf-8")
    print(text)
    return metrics, pred_rows


def _safety_markdown(rates: Mapping[str, dict[str, Any]]) -> str:
    """Flagged outputs per arm, with the exact (Clopper-Pearson) interval :func:`safety.flag_rate` gives:
    0/96 flagged is not a rate known to be 0."""
    if not rates:
        return ""
    lines = ["\n## Safety review of outputs\n", "| model | flagged | rate (95% CI, exact) |", "|---|---|---|"]
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
            if ms.tasks[task].labels_loglik:  # and the label it gives the most probability
                row[f"{name}_label_loglik"] = ms.tasks[task].labels_loglik[k]
            row[f"{name}_scores"] = ms.tasks[task].per_example[k]
            if name in flags:
                row[f"{name}_flags"] = flags[name][i]
        if "base_kshot" in arms:  # the k-shot arm's prompt holds the exemplars, shown for review
            row["base_kshot_prompt"] = arms["base_kshot"][i]["prompt"]
        out.append(row)
    return out


def _write(out: Path, metrics: dict, headline: dict, intervals: dict, pred_rows: list[dict[str, Any]]) -> None:
    from pipeline.evaluation.scoring import json_safe  # NaN is not JSON: null instead

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "headline.json", json_safe(headline))
    write_json(out / "metrics.json", json_safe(metrics))
    write_json(out / "intervals.json", json_safe(intervals))
    write_jsonl(out / "predictions.jsonl", json_safe(pred_rows))


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


def _open_run(cfg: config.PipelineConfig, paths: Paths, tracking: Tracking, template_hash: str) -> tuple[Any, str]:
    """The MLflow run the scores go into, set RUNNING: the tuned model's training run (found by the
    model folder's digest), or a new run for a zero-shot baseline or a model whose run is elsewhere."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    client = mlf.locked_write(tracking.uri, lambda: MlflowClient(tracking.uri))
    digest = stage_run.model_digest(paths.tuned) if "tuned" in cfg.eval.models and paths.tuned else None
    run_id = stage_run.find_model_run(client, cfg.tracking.experiment, digest, tracking.job_dir) if digest else None
    if run_id is not None:
        mlf.locked_write(tracking.uri, lambda: client.update_run(run_id, status="RUNNING"))
        return client, run_id
    tags = {**mlf.run_tags(tracking.repo_root, hash_files([paths.rendered / "test.jsonl"]), template_hash,
                           tracking.dvc_exp_name, tracking.parent_run_id, tracking.sweep_id),
            **({stage_run.DIGEST_TAG: digest} if digest else {"eval.baseline": "zero-shot"}),
            **({stage_run.JOB_TAG: tracking.job_dir} if tracking.job_dir else {})}
    params = {k: config.to_dict(getattr(cfg, k)) for k in ("model", "data", "prompt", "eval", "seed")}
    name = f"evaluate-{cfg.model.name}" if digest else f"zero-shot-{cfg.model.name}"
    return client, mlf.start_run(tracking.uri, cfg.tracking.experiment, tracking.artifact_root,
                                 mlf.redact_tree(params), tags, run_name=tracking.run_name or name)


def _log_mlflow(tracking: Tracking, run_id: str, metrics: dict, pred_rows: list, out: Path, prepared: Path,
                rendered: Path) -> None:
    """The metrics (named in sections, tied to the tuned model's LoggedModel), the test split as
    a dataset, the headline as the run's description, the per-example table, the slice table, every
    output file and prepare's safety counts."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    flat = {k: float(v) for k, v in config.flatten(metrics).items() if isinstance(v, (int, float))}
    table = pd.DataFrame([{**{k: v for k, v in r.items() if not k.endswith("_scores")},
                           **{f"{k}.{s}": x for k in r if k.endswith("_scores") for s, x in r[k].items()}}
                          for r in pred_rows])
    slices = pd.DataFrame(read_json(out / "intervals.json")["slices"]["rows"])

    test = views.split_dataset(pred_rows, rendered / "test.jsonl", hash_files([rendered / "test.jsonl"]), "test")
    model_id = MlflowClient(tracking.uri).get_run(run_id).data.tags.get(views.MODEL_ID_TAG)

    def log() -> None:
        mlflow.log_input(test, context="test")
        # On the test set, and (when train logged one) on the tuned model's LoggedModel page.
        mlflow.log_metrics({views.eval_metric_name(k): v for k, v in flat.items()}, model_id=model_id, dataset=test)
        mlflow.set_tag(views.NOTE_TAG, "## Headline (95% intervals, paired p-values)\n\n"
                       + views.headline_markdown(read_json(out / "headline.json")))
        mlflow.log_table(table, artifact_file="eval/predictions.json")
        views.log_examples(pred_rows, "tuned" if "tuned" in metrics else next(iter(metrics)))
        mlflow.log_table(slices, artifact_file="eval/slice_table.json")
        mlflow.log_artifacts(str(out), artifact_path="eval")
        _log_prepare_safety(prepared)

    with mlf.active_run(tracking.uri, run_id):
        mlf.locked_write(tracking.uri, log)


def _log_prepare_safety(prepared: Path) -> None:
    """What prepare's safety filter quarantined, in the run that evaluates the model trained on the rest.

    (Logged into the run evaluate writes to, usually train's: the filter stays visible beside the scores.)
    """
    import mlflow

    path = prepared / "safety.json"
    if not path.exists():
        return
    counts = read_json(path)
    mlflow.log_metric("prepare/safety/quarantined", counts["quarantined"])
    # MLflow metric names allow only [\w\-. /]: a rule such as "keyword:pipe bomb" is spelt out safely.
    mlflow.log_metrics({"prepare/safety/" + re.sub(r"[^\w\-. /]", "_", rule): n
                        for rule, n in counts["by_rule"].items()})
    mlflow.log_dict(counts, "prepare/safety.json")
    if (prepared / "quarantine.jsonl").exists():
        mlflow.log_artifact(str(prepared / "quarantine.jsonl"), artifact_path="prepare")


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    run(config.load(params), paths, Tracking.from_env(Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("evaluate", main))

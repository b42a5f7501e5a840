"""Compare experiments: what differs in config, data and prompt, and how the metrics moved.

``python -m pipeline.compare RUN_ID RUN_ID ...``   MLflow runs
``python -m pipeline.compare --sweep ID``          the children of a sweep (parent run id or ``sweep.id`` tag)
``python -m pipeline.compare --revs A B``          two git revisions, through ``dvc params diff`` and
                                                   ``dvc metrics diff`` (evaluate's ``headline.json``: each
                                                   paired difference with its interval and p-value) and
                                                   the files DVC keeps in git
``python -m pipeline.compare --evals DIR DIR ...``  evaluate outputs (``metrics.json`` + ``intervals.json``),
                                                   e.g. the encoder's and the causal LM's on the same test split
``python -m pipeline.compare --arms SOURCE ...``    the arms of ONE experiment side by side (base zero-shot,
                                                   base k-shot, tuned, encoder): each task's primary metric
                                                   (and macro-F1) with its CI and every paired difference
                                                   with its CI and p-value. SOURCE is an evaluate folder, a
                                                   git revision (its ``reports/eval``) or an MLflow run id;
                                                   ``--evals DIR`` with one folder means the same.

``--task TASK`` keeps only that task's metrics and shows them even where the runs agree:
the side-by-side table of two models on one task.

Prints Markdown (paste it into a PR) or JSON (``--format json``): the config keys whose
values differ, the data and template hashes, and every evaluation metric that differs
with its 95% bootstrap interval (from ``intervals.json``), plus, for two runs, the
difference. ``--plot`` writes a PNG of one metric against each parameter that varies.
This is a tool, not a pipeline stage: it only reads.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.core.config import flatten
from pipeline.tracking.views import eval_metric_key

DEFAULT_METRIC = "eval.tuned.overall.score"
# evaluate's DVC metrics file (the headline: paired differences with intervals and p-values) and every
# metric beside it (an out, not a DVC metric, so that `dvc exp show` stays readable).
EVAL_METRICS = ("reports/eval/headline.json", "reports/eval/metrics.json")


@dataclass
class Run:
    """One side of a comparison: an MLflow run or a git revision."""

    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # git.commit, data.hash, template.hash
    p_values: dict[str, float] = field(default_factory=dict)  # a paired difference's p-value (headline.json)


def intervals_by_metric(doc: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """evaluate's ``intervals.json`` -> ``{"eval.tuned.topic.accuracy": (low, high), ...}``."""
    out: dict[str, tuple[float, float]] = {}
    for model, tasks in doc.get("intervals", {}).items():
        for task, by_metric in tasks.items():
            for metric, ci in by_metric.items():
                out[f"eval.{model}.{task}.{metric}"] = tuple(_ci(ci))  # type: ignore[assignment]
    return out


# ---- MLflow runs -------------------------------------------------------------------------

def from_mlflow(uri: str, run_ids: Sequence[str]) -> list[Run]:
    """Runs with their params, ``eval.*`` metrics, hashes and intervals (from the logged artifact)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = []
    for run_id in run_ids:
        r = client.get_run(run_id)
        runs.append(Run(
            name=r.info.run_name or run_id[:8],
            params=dict(r.data.params),
            metrics={f"eval.{key}": v for k, v in r.data.metrics.items() if (key := eval_metric_key(k))},
            intervals=_logged_intervals(uri, run_id),
            hashes={k: r.data.tags[k] for k in ("git.commit", "data.hash", "template.hash") if k in r.data.tags},
        ))
    return runs


def _logged_intervals(uri: str, run_id: str) -> dict[str, tuple[float, float]]:
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/intervals.json",
                                                   tracking_uri=uri)
    except Exception:  # a run that never reached evaluate has no intervals; its metrics show without CIs
        return {}
    return intervals_by_metric(json.loads(Path(path).read_text(encoding="utf-8")))


def sweep_children(uri: str, sweep: str) -> tuple[list[str], dict[str, str]]:
    """Child run ids of a sweep given its parent run id or ``sweep.id`` tag, and the parent's params."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import SWEEP_TAG, child_runs

    client = MlflowClient(uri)
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`sweep.role` = 'parent'")
    if parents:
        parent = parents[0]
    else:
        try:
            parent = client.get_run(sweep)
        except Exception:
            raise SystemExit(f"compare: no sweep {sweep!r} in {uri} (neither a parent run id nor a sweep.id tag)")
    return [r.info.run_id for r in child_runs(uri, parent.info.run_id)], dict(parent.data.params)


# ---- git revisions, through DVC ------------------------------------------------------------

def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compare: `{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
    return proc.stdout


def _git_file(repo: Path, rev: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _metric_name(file: str, key: str) -> str:
    """reports/eval/metrics.json + tuned.topic.accuracy -> eval.tuned.topic.accuracy (MLflow's names)."""
    return f"{Path(file).parent.name}.{key}"


def from_revisions(repo: Path, a: str, b: str) -> list[Run]:
    """Both revisions' changed params and metrics (``dvc params/metrics diff``), hashes and intervals."""
    dvc = [sys.executable, "-m", "dvc"]
    params_diff = json.loads(_run([*dvc, "params", "diff", a, b, "--json"], repo) or "{}")
    metrics_diff = json.loads(_run([*dvc, "metrics", "diff", a, b, "--all", "--json", "--targets", *EVAL_METRICS],
                                   repo) or "{}")
    runs = []
    for side, rev in (("old", a), ("new", b)):
        commit = _run(["git", "rev-parse", rev], repo).strip()
        params = {k: str(v[side]) for changes in params_diff.values() for k, v in changes.items()}
        metrics = {_metric_name(f, k): float(v[side]) for f, changes in metrics_diff.items()
                   for k, v in changes.items() if isinstance(v.get(side), (int, float))}
        intervals, hashes = _revision_extras(repo, rev, commit)
        metrics, headline_cis, p_values = fold_headline(metrics)
        runs.append(Run(rev, params, metrics, {**intervals, **headline_cis}, hashes, p_values))
    return runs


HEADLINE_FIELDS = ("ci_low", "ci_high", "p")


def fold_headline(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, tuple[float, float]],
                                                      dict[str, float]]:
    """``headline.json``'s paired differences as one metric each, with its interval and p-value.

    ``eval.delta.topic.accuracy``, ``eval.delta.topic.ci_low``, ``.ci_high`` and ``.p`` become the
    metric ``eval.delta.topic.accuracy`` with the interval ``(ci_low, ci_high)`` and the p-value ``p``.
    """
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        head, _, leaf = key.rpartition(".")
        if leaf in HEADLINE_FIELDS:
            groups.setdefault(head, {})[leaf] = value
    kept = {k: v for k, v in metrics.items() if k.rpartition(".")[0] not in groups
            or k.rpartition(".")[2] not in HEADLINE_FIELDS}
    intervals, p_values = {}, {}
    for head, fields in groups.items():
        for key in (k for k in kept if k.rpartition(".")[0] == head):
            if "ci_low" in fields and "ci_high" in fields:
                intervals[key] = (fields["ci_low"], fields["ci_high"])
            if "p" in fields:
                p_values[key] = fields["p"]
    return kept, intervals, p_values


def _revision_extras(repo: Path, rev: str, commit: str) -> tuple[dict, dict]:
    """Intervals (evaluate's git-tracked intervals.json) and hashes (from dvc.lock) at ``rev``."""
    text = _git_file(repo, rev, "reports/eval/intervals.json")
    doc = json.loads(text) if text else {}
    hashes = {"git.commit": commit}
    if doc.get("template_hash"):
        hashes["template.hash"] = doc["template_hash"]
    lock = yaml.safe_load(_git_file(repo, rev, "dvc.lock") or "{}") or {}
    for out in lock.get("stages", {}).get("prepare", {}).get("outs", []):
        if out.get("path") == "data/prepared":
            hashes["data.hash"] = out.get("md5", "")
    return intervals_by_metric(doc), hashes


# ---- evaluation directories ----------------------------------------------------------------

def from_eval_dirs(dirs: Sequence[Path]) -> list[Run]:
    """Runs from evaluate's output folders; params from the ``params.yaml`` two levels up
    (the DVC layout ``<repo>/reports/eval``) when there is one."""
    runs = []
    for d in dirs:
        metrics = {f"eval.{k}": float(v) for k, v in flatten(json.loads((d / "metrics.json").read_text())).items()
                   if isinstance(v, (int, float))}
        doc = json.loads((d / "intervals.json").read_text()) if (d / "intervals.json").exists() else {}
        params_file = d.resolve().parents[1] / "params.yaml"
        params = ({k: str(v) for k, v in flatten(yaml.safe_load(params_file.read_text()) or {}).items()}
                  if params_file.exists() else {})
        hashes = {"template.hash": doc["template_hash"]} if doc.get("template_hash") else {}
        runs.append(Run(str(d), params, metrics, intervals_by_metric(doc), hashes))
    return runs


# ---- the arms of one experiment ------------------------------------------------------------

# Arm tables show each task's primary metric (the one evaluate's bars and overall score use),
# and macro-F1 for classification tasks: accuracy alone hides a class the model never predicts.
EXTRA = {"classification": ("macro_f1",)}
EVAL_FILES = ("metrics.json", "intervals.json")


@dataclass
class Evaluation:
    """One evaluate output: its ``metrics.json`` and ``intervals.json``, and where they came from."""

    name: str
    metrics: dict[str, Any]
    intervals: dict[str, Any]


def _parse_eval(name: str, texts: Sequence[str]) -> Evaluation:
    docs = []
    for file, text in zip(EVAL_FILES, texts):
        try:
            docs.append(json.loads(text))
        except json.JSONDecodeError as err:
            raise SystemExit(f"compare: {name}/{file} line {err.lineno}: not JSON ({err.msg})")
    return Evaluation(name, *docs)


def load_evaluation(source: str, repo: Path, uri: str) -> Evaluation:
    """An evaluate output from a folder, a git revision of ``repo`` (its ``reports/eval``), or an MLflow run."""
    folder = Path(source)
    if folder.is_dir():
        missing = [f for f in EVAL_FILES if not (folder / f).is_file()]
        if missing:
            raise SystemExit(f"compare: {folder} has no {' or '.join(missing)}: is it evaluate's --out folder?")
        return _parse_eval(str(folder), [(folder / f).read_text(encoding="utf-8") for f in EVAL_FILES])
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{source}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode == 0:
        texts = [_git_file(repo, source, f"reports/eval/{f}") for f in EVAL_FILES]
        if None in texts:
            raise SystemExit(f"compare: revision {source} of {repo} has no reports/eval/metrics.json and "
                             "intervals.json committed (run evaluate and commit its outputs)")
        return _parse_eval(f"{source} ({proc.stdout.strip()[:10]})", texts)  # type: ignore[arg-type]
    return _parse_eval(f"run {source}", _mlflow_eval_texts(uri, source))


def _mlflow_eval_texts(uri: str, run_id: str) -> list[str]:
    import mlflow

    texts = []
    for f in EVAL_FILES:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"eval/{f}", tracking_uri=uri)
        except Exception as err:  # MLflow raises several types for "no such run" / "no such artifact"
            raise SystemExit(f"compare: {run_id!r} is neither a folder, a git revision nor an MLflow run in {uri} "
                             f"with eval/{f} ({type(err).__name__}: {err})")
        texts.append(Path(path).read_text(encoding="utf-8"))
    return texts


def _ci(value: Any) -> list[float] | None:
    if value is None:
        return None
    low, high = (value["low"], value["high"]) if isinstance(value, dict) else value
    return [float(low), float(high)]


def arms_table(ev: Evaluation, task: str | None = None) -> dict[str, Any]:
    """Every arm's value [CI] and every paired difference [CI, p] per task and metric, as plain data.

    Rows are each task's primary metric (plus :data:`EXTRA`) and the overall score; with ``task``,
    every metric of that task. An arm that did not score a task (the encoder on a generation
    task) has ``None`` there. Where evaluate recorded them, cells carry ``n`` (the task's examples)
    and differences their ``n``, ``test`` and the bootstrap's ``p_floor``.
    """
    where = f"{ev.name}/intervals.json"
    intervals = ev.intervals.get("intervals")
    task_types = ev.intervals.get("task_types")
    if not isinstance(intervals, dict) or not isinstance(task_types, dict):
        raise SystemExit(f"compare: {where}: no 'intervals' and 'task_types' fields (written by an older evaluate?)")
    from pipeline.evaluation.scoring import PRIMARY, delta_pair

    pairs = {k: pair for k in intervals if (pair := delta_pair(k)) is not None}
    arms = [k for k in intervals if k not in pairs]
    if task is not None and task not in task_types:
        raise SystemExit(f"compare: --task {task}: {where} has tasks {', '.join(sorted(task_types))}")

    keys = []
    for t in sorted(task_types) if task is None else [task]:
        if task is None:
            keys += [(t, m) for m in (PRIMARY[task_types[t]], *EXTRA.get(task_types[t], ()))]
        else:
            keys += [(t, m) for m in dict.fromkeys(m for a in arms for m in ev.metrics.get(a, {}).get(t, {}))]
    keys.append(("overall", "score"))
    counts = ev.intervals.get("n", {})
    rows = []
    for t, m in keys:
        cells = {}
        for a in arms:
            value = ev.metrics.get(a, {}).get(t, {}).get(m)
            n = {"n": counts[t]} if t in counts else {}
            cells[a] = None if value is None else {"value": float(value), **n,
                                                   "ci": _ci(intervals[a].get(t, {}).get(m))}
        diffs = {}
        for k, (a, b) in pairs.items():
            d = intervals[k].get(t, {}).get(m)
            diffs[f"{a} − {b}"] = None if d is None else {
                "delta": float(d["delta"]), "ci": _ci(d), "p_value": d.get("p_value"),
                **{key: d[key] for key in ("n", "test", "p_floor") if key in d}}
        rows.append({"task": t, "metric": m, "arms": cells, "differences": diffs})
    return {"name": ev.name, "arms": arms, "differences": [f"{a} − {b}" for a, b in pairs.values()], "rows": rows}


def arms_markdown(tables: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per evaluation: arms, then paired differences, each with its 95% CI; a cell
    of fewer than ``MIN_N`` examples shows its count, and a p-value at the bootstrap's floor ``p≤``."""
    from pipeline.evaluation.scoring import delta_cell, value_cell

    out = []
    for tab in tables:
        cols = tab["arms"] + [f"{d} (95% CI, p)" for d in tab["differences"]]
        out.append(f"## Arms of {tab['name']} (95% CI; differences are paired)\n\n"
                   "| task | metric | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n")
        for row in tab["rows"]:
            cells = ["—" if c is None else value_cell(c["value"], c["ci"], c.get("n"))
                     for c in (row["arms"][a] for a in tab["arms"])]
            cells += [delta_cell(None if d is None else {**d, "low": d["ci"][0], "high": d["ci"][1]})
                      for d in (row["differences"][n] for n in tab["differences"])]
            out.append(f"| {row['task']} | {row['metric']} | " + " | ".join(cells) + " |\n")
        out.append("\n")
    return "".join(out)


# ---- the report ------------------------------------------------------------------------------

def differing(values: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keys whose value is not the same in every mapping (missing counts as a value)."""
    keys = sorted(set().union(*values)) if values else []
    return {k: [v.get(k) for v in values] for k in keys if len({json.dumps(v.get(k)) for v in values}) > 1}


def _task_metrics(runs: list[Run], task: str) -> dict[str, list[Any]]:
    """Every ``eval.<model>.<task>.<metric>`` of any run, equal or not."""
    keys = sorted({k for r in runs for k in r.metrics if k.split(".")[2:3] == [task]})
    return {k: [r.metrics.get(k) for r in runs] for k in keys}


def report(runs: list[Run], task: str | None = None) -> dict[str, Any]:
    """Everything the tables show, as plain data (this is the JSON output)."""
    metrics = {}
    rows = _task_metrics(runs, task) if task else differing([r.metrics for r in runs])
    for key, values in rows.items():
        cells = [{"value": v, "ci": list(r.intervals[key]) if key in r.intervals else None,
                  **({"p": r.p_values[key]} if key in r.p_values else {})} for v, r in zip(values, runs)]
        entry: dict[str, Any] = {"runs": cells}
        if len(runs) == 2 and None not in values:
            entry["diff"] = values[1] - values[0]
            a, b = cells[0]["ci"], cells[1]["ci"]
            entry["intervals_overlap"] = None if not (a and b) else not (a[1] < b[0] or b[1] < a[0])
        metrics[key] = entry
    return {
        "runs": [{"name": r.name, **r.hashes} for r in runs],
        "config": differing([r.params for r in runs]),
        "hashes": differing([r.hashes for r in runs]),
        "metrics": metrics,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "—" if v is None else str(v)


def markdown(rep: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    names = [r["name"] for r in rep["runs"]]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    out = ["## Runs\n", "| run | git commit | data hash | template hash |\n|---|---|---|---|\n"]
    out += [f"| {r['name']} | {r.get('git.commit', '—')[:10]} | {r.get('data.hash', '—')[:12]} | "
            f"{r.get('template.hash', '—')[:12]} |\n" for r in rep["runs"]]
    out.append("\n## Config that differs\n\n")
    out.append(head + "".join(f"| `{k}` | " + " | ".join(_fmt(v) for v in vs) + " |\n"
                              for k, vs in rep["config"].items()) if rep["config"] else "(none)\n")
    out.append("\n## Data and template\n\n")
    out.append(head + "".join(f"| {k} | " + " | ".join(_fmt(v)[:12] for v in vs) + " |\n"
                              for k, vs in rep["hashes"].items() if k != "git.commit")
               if set(rep["hashes"]) - {"git.commit"} else "same data and template in every run\n")
    out.append(f"\n## Metrics of task {rep['task']} (95% bootstrap CI)\n\n" if rep.get("task")
               else "\n## Metrics that differ (95% bootstrap CI)\n\n")
    two = len(names) == 2
    out.append("| metric | " + " | ".join(names) + (" | diff | CIs overlap |" if two else " |") + "\n|---|"
               + "---|" * (len(names) + (2 if two else 0)) + "\n")
    for key, entry in rep["metrics"].items():
        cells = [_fmt(c["value"]) + (f" [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]" if c["ci"] else "")
                 + (f" p={c['p']:.3g}" if c.get("p") is not None else "") for c in entry["runs"]]
        extra = [f"{entry['diff']:+.4g}" if "diff" in entry else "—", _fmt(entry.get("intervals_overlap"))] if two else []
        out.append(f"| {key} | " + " | ".join(cells + extra) + " |\n")
    return "".join(out)


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot(runs: list[Run], metric: str, path: Path) -> list[str]:
    """One panel per varying parameter: ``metric`` (with its CI) against that parameter. Returns the params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [k for k in differing([r.params for r in runs]) if not k.startswith("sweep.")]
    fig, axes = plt.subplots(1, max(len(swept), 1), figsize=(4.5 * max(len(swept), 1), 3.6), squeeze=False)
    for ax, key in zip(axes[0], swept or [None]):
        if key is None:
            ax.text(0.5, 0.5, "no parameter varies", ha="center", va="center")
            continue
        xs = [r.params.get(key) for r in runs]
        numeric = all(_number(x) is not None for x in xs)
        order = sorted(set(xs), key=lambda x: (_number(x) if numeric else str(x)))
        for r, x in zip(runs, xs):
            if metric not in r.metrics:
                continue
            y = r.metrics[metric]
            lo, hi = r.intervals.get(metric, (y, y))
            pos = _number(x) if numeric else order.index(x)
            ax.errorbar([pos], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=3, color="tab:blue")
        if numeric and len(order) > 1 and min(map(float, order)) > 0 and max(map(float, order)) / min(map(float, order)) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), [str(o) for o in order])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} (95% CI) against each varying parameter")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return swept


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_ids", nargs="*", default=[], help="MLflow run ids")
    parser.add_argument("--sweep", help="a sweep: its parent run id or its sweep.id tag")
    parser.add_argument("--revs", nargs=2, metavar=("A", "B"), help="two git revisions of the repo at --repo")
    parser.add_argument("--evals", nargs="+", type=Path, metavar="DIR",
                        help="evaluate output folders (one folder: its arms side by side, as --arms)")
    parser.add_argument("--arms", nargs="+", metavar="SOURCE",
                        help="the arms of one experiment side by side: evaluate folders, git revisions or MLflow runs")
    parser.add_argument("--task", help="show every metric of this task, side by side, even where runs agree")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="git/DVC repository for --revs")
    parser.add_argument("--metric", help=f"metric to plot (default: the sweep's metric, else {DEFAULT_METRIC})")
    parser.add_argument("--plot", type=Path, default=Path("compare.png"), help="PNG to write (default compare.png)")
    parser.add_argument("--format", choices=("md", "json"), default="md")
    parser.add_argument("--out", type=Path, help="write the report here instead of stdout")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.run_ids, args.sweep, args.revs, args.evals, args.arms))) != 1:
        parser.error("give run ids, --sweep, --revs, --evals or --arms (exactly one of them)")

    from pipeline.tracking.runs import default_uri

    uri = args.tracking_uri or default_uri(Path.cwd())
    if args.evals and len(args.evals) == 1:
        args.arms = [str(args.evals[0])]
    if args.arms:
        tables = [arms_table(load_evaluation(s, args.repo, uri), args.task) for s in args.arms]
        return _emit(json.dumps({"arms": tables}, indent=2) + "\n" if args.format == "json"
                     else arms_markdown(tables), args.out)
    metric = args.metric
    if args.revs:
        runs = from_revisions(args.repo, *args.revs)
    elif args.evals:
        runs = from_eval_dirs(args.evals)
    elif args.sweep:
        ids, parent_params = sweep_children(uri, args.sweep)
        metric = metric or parent_params.get("sweep.metric")
        runs = from_mlflow(uri, ids)
    else:
        if len(args.run_ids) < 2:
            parser.error("give at least two run ids, --sweep or --revs")
        runs = from_mlflow(uri, args.run_ids)
    if len(runs) < 2:
        raise SystemExit(f"compare: need at least two runs, found {len(runs)}")
    rep = report(runs, args.task)
    rep["task"] = args.task
    rep["metric"] = metric or DEFAULT_METRIC
    rep["swept"] = plot(runs, rep["metric"], args.plot)
    rep["plot"] = str(args.plot)
    text = json.dumps(rep, indent=2) + "\n" if args.format == "json" else (
        markdown(rep) + f"\nPlot of `{rep['metric']}` against {', '.join(rep['swept']) or 'nothing'}: {args.plot}\n")
    return _emit(text, args.out)


def _emit(text: str, out: Path | None) -> int:
    if out:
        out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

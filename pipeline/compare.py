"""Compare experiments: what differs in config, data and prompt, and how the metrics moved.

``python -m pipeline.compare RUN_ID RUN_ID ...``   MLflow runs
``python -m pipeline.compare --sweep ID``          the children of a sweep (parent run id or ``sweep.id`` tag)
``python -m pipeline.compare --revs A B``          two git revisions, through ``dvc params diff`` and
                                                   ``dvc metrics diff`` (and the files DVC keeps in git)
``python -m pipeline.compare --evals DIR DIR ...``  evaluate outputs (``metrics.json`` + ``intervals.json``),
                                                   e.g. the encoder's and the causal LM's on the same test split

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

from pipeline.config import flatten

DEFAULT_METRIC = "eval.tuned.overall.score"


@dataclass
class Run:
    """One side of a comparison: an MLflow run or a git revision."""

    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # git.commit, data.hash, template.hash


def intervals_by_metric(doc: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """evaluate's ``intervals.json`` -> ``{"eval.tuned.topic.accuracy": (low, high), ...}``."""
    out: dict[str, tuple[float, float]] = {}
    for model, tasks in doc.get("intervals", {}).items():
        for task, by_metric in tasks.items():
            for metric, ci in by_metric.items():
                low, high = (ci["low"], ci["high"]) if isinstance(ci, dict) else ci
                out[f"eval.{model}.{task}.{metric}"] = (float(low), float(high))
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
            metrics={k: v for k, v in r.data.metrics.items() if k.startswith("eval.")},
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

    from pipeline.tracking import SWEEP_TAG, child_runs

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
    metrics_diff = json.loads(_run([*dvc, "metrics", "diff", a, b, "--all", "--json"], repo) or "{}")
    runs = []
    for side, rev in (("old", a), ("new", b)):
        commit = _run(["git", "rev-parse", rev], repo).strip()
        params = {k: str(v[side]) for changes in params_diff.values() for k, v in changes.items()}
        metrics = {_metric_name(f, k): float(v[side]) for f, changes in metrics_diff.items()
                   for k, v in changes.items() if isinstance(v.get(side), (int, float))}
        runs.append(Run(rev, params, metrics, *_revision_extras(repo, rev, commit)))
    return runs


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
        cells = [{"value": v, "ci": list(r.intervals[key]) if key in r.intervals else None} for v, r in zip(values, runs)]
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
        cells = [_fmt(c["value"]) + (f" [{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]" if c["ci"] else "") for c in entry["runs"]]
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
    parser.add_argument("--evals", nargs="+", type=Path, metavar="DIR", help="evaluate output folders")
    parser.add_argument("--task", help="show every metric of this task, side by side, even where runs agree")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="git/DVC repository for --revs")
    parser.add_argument("--metric", help=f"metric to plot (default: the sweep's metric, else {DEFAULT_METRIC})")
    parser.add_argument("--plot", type=Path, default=Path("compare.png"), help="PNG to write (default compare.png)")
    parser.add_argument("--format", choices=("md", "json"), default="md")
    parser.add_argument("--out", type=Path, help="write the report here instead of stdout")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.run_ids, args.sweep, args.revs, args.evals))) != 1:
        parser.error("give run ids, --sweep, --revs or --evals (exactly one of them)")

    from pipeline.tracking import default_uri

    uri = args.tracking_uri or default_uri(Path.cwd())
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
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

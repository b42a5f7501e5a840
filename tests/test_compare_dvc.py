"""Across commits and DVC experiment queues, for real, in temporary git repos (both slow: each runs the
smoke pipeline more than once), plus the store location rule that makes queued runs land in the repo."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sweep_helpers import copy_checkout, sh, stdout_of

from pipeline.tracking import runs as tracking

DVC = [sys.executable, "-m", "dvc"]


def test_default_store_follows_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued experiments run in a throw-away copy; DVC_ROOT names the real repository."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    workspace, repo = tmp_path / ".dvc/tmp/exps/tmp123", tmp_path
    assert tracking.default_uri(workspace) == f"sqlite:///{workspace.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.default_uri(workspace) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
    assert tracking.store_root(workspace) == repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_uri(workspace) == "http://127.0.0.1:5000"


def _repo(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    repo = tmp_path_factory.mktemp(name)
    copy_checkout(repo)
    sh(["git", "init", "-q"], repo)
    return repo


def _smoke_lr(repo: Path, lr: str) -> None:
    """Change one value in conf/ (the smoke experiment's learning rate) and regenerate params.yaml."""
    smoke = repo / "conf/experiment/smoke.yaml"
    smoke.write_text(re.sub(r"(?m)^  lr: .*$", f"  lr: {lr}", smoke.read_text()))
    sh([sys.executable, "-m", "pipeline.params", "+experiment=smoke"], repo)


@pytest.mark.slow
def test_compare_two_commits_names_the_changed_value(tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = _repo(tmp_path_factory, "commits")
    for lr in ("1.0e-3", "3.0e-3"):
        _smoke_lr(repo, lr)
        sh([*DVC, "repro"], repo)
        sh(["git", "add", "-A"], repo)
        sh(["git", "commit", "-qm", f"smoke lr={lr}"], repo)
    report = json.loads(stdout_of([sys.executable, "-m", "pipeline.compare", "--revs", "HEAD~1", "HEAD",
                                   "--format", "json", "--plot", str(repo / "compare.png")], repo))
    assert report["config"] == {"trainer.lr": ["0.001", "0.003"]}
    assert report["hashes"].keys() == {"git.commit"}, "same data and template, different commits"
    metrics = report["metrics"]
    assert "eval.tuned.topic.perplexity" in metrics and "eval.base.topic.perplexity" not in metrics
    cells = metrics["eval.tuned.topic.perplexity"]["runs"]
    assert all(isinstance(c["value"], float) for c in cells)
    assert metrics["eval.tuned.topic.perplexity"]["diff"] == pytest.approx(cells[1]["value"] - cells[0]["value"])
    for side in (0, 1):
        assert any(m.startswith("eval.tuned.") and e["runs"][side]["value"] is not None for m, e in metrics.items())
    md = sh([sys.executable, "-m", "pipeline.compare", "--revs", "HEAD~1", "HEAD", "--plot",
             str(repo / "compare2.png")], repo)
    assert "| `trainer.lr` | 0.001 | 0.003 |" in md and "eval.tuned.topic.perplexity" in md
    assert (repo / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # `dvc metrics diff` reads evaluate's headline: the paired differences with their intervals and p-values.
    diff = json.loads(stdout_of([*DVC, "metrics", "diff", "HEAD~1", "HEAD", "--all", "--json"], repo))
    assert {"delta.overall.score", "delta.overall.ci_low", "delta.overall.ci_high",
            "delta.overall.p"} <= set(diff["reports/eval/headline.json"])
    # `dvc plots diff`: both commits' loss curves and per-task bars on one HTML page.
    sh([*DVC, "plots", "diff", "HEAD~1", "HEAD", "-o", str(repo / "plots_diff")], repo)
    page = (repo / "plots_diff" / "index.html").read_text()
    shown = json.loads(stdout_of([*DVC, "plots", "diff", "HEAD~1", "HEAD", "--json"], repo))["data"]
    assert {"loss", "reports/eval/per_task.json"} <= set(shown) and "per-task primary metric" in page
    revs = {r for entry in shown["loss"] for r in entry["revisions"]}
    assert revs == {"HEAD~1", "HEAD"}, revs


def _columns(repo: Path, *flags: str) -> list[str]:
    return next(csv.reader(io.StringIO(stdout_of([*DVC, "exp", "show", "--csv", *flags], repo))))


@pytest.mark.slow
def test_exp_show_of_two_experiments_fits_a_terminal(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The smoke pipeline committed, then one experiment with another learning rate: `dvc exp show`
    reads only evaluate's headline (each arm, each paired difference with its interval and p-value),
    and `--only-changed` fits a terminal. The other reports stay readable by `dvc metrics show FILE`."""
    repo = _repo(tmp_path_factory, "columns")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo)
    sh([*DVC, "exp", "run", "-S", "+experiment=smoke"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "smoke"], repo)
    sh([*DVC, "exp", "run", "-S", "+experiment=smoke", "-S", "trainer.lr=3e-3"], repo)
    plain, changed = _columns(repo), _columns(repo, "--only-changed")
    shown = json.loads(stdout_of([*DVC, "exp", "show", "--json"], repo))
    files = {f for b in shown for r in [b, *[e["revs"][0] for e in b.get("experiments") or []]]
             for f in ((r.get("data") or {}).get("metrics") or {})}
    # evaluate's one metrics file; other stages' reports (prepare, render, every metric) are plain outputs.
    assert "reports/eval/headline.json" in files, files
    assert not files & {"reports/prepare/stats.json", "reports/render/report.json", "reports/eval/metrics.json"}
    headline = json.loads((repo / "reports/eval/headline.json").read_text())
    n_metrics = sum(1 for _ in _leaves(headline))
    # The smoke model's answers may not move with the learning rate; every metric the tuned model enters
    # could: the bound holds even then.
    tuned = sum(1 for k, v in headline.items() if k in ("tuned", "delta") or k.startswith("delta_tuned")
                for _ in _leaves(v))
    print(f"dvc exp show --csv: {len(plain)} columns ({n_metrics} metrics); --only-changed: {len(changed)} "
          f"{changed}; at most {len(set(changed) - set(_headline_columns(headline))) + tuned} if all {tuned} "
          "metrics of the tuned model changed")
    assert {"delta.overall.score", "delta.overall.ci_low", "delta.overall.ci_high", "delta.overall.p",
            "tuned.overall.score", "delta.topic.accuracy", "delta.topic.p"} <= set(plain)
    assert n_metrics <= 60 and "trainer.lr" in changed, changed
    assert len(set(changed) - set(_headline_columns(headline))) + tuned <= 40, changed
    stats = json.loads(stdout_of([*DVC, "metrics", "show", "--json", "reports/prepare/stats.json",
                                  "reports/eval/metrics.json"], repo))
    data = next(iter(stats.values()))["data"]
    assert data["reports/prepare/stats.json"]["data"]["splits"] and data["reports/eval/metrics.json"]["data"]["tuned"]


def _headline_columns(d: dict[str, Any], prefix: str = "") -> list[str]:
    return [c for k, v in d.items() for c in (_headline_columns(v, f"{prefix}{k}.") if isinstance(v, dict)
                                               else [f"{prefix}{k}"])]


def _leaves(d: Any) -> Any:
    for v in d.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]


@pytest.mark.slow
def test_dvc_queue_runs_land_in_the_repository_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = _repo(tmp_path_factory, "queue")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo)
    sh([*DVC, "exp", "run", "--queue", "-S", "+experiment=smoke", "-S", "trainer.lr=1e-4,3e-4"], repo)
    sh([*DVC, "queue", "start", "--jobs", "1"], repo)  # one worker: the queue runs serially (DVC's default)
    deadline = time.monotonic() + 900
    while True:
        status = sh([*DVC, "queue", "status"], repo)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(stdout_of([*DVC, "exp", "show", "--json"], repo))
    exps = [e for baseline in shown for e in (baseline.get("experiments") or [])]
    lrs = sorted(e["revs"][0]["data"]["params"]["params.yaml"]["data"]["trainer"]["lr"] for e in exps)
    assert lrs == [1e-4, 3e-4]
    assert all(e["revs"][0]["data"]["metrics"]["reports/eval/headline.json"]["data"]["tuned"] for e in exps)
    # Both queued runs logged into the repository's store, not into their deleted temp copies.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("instruction-tuning").experiment_id])
    runs = [r for r in found if r.data.tags.get("arm") != "encoder"]  # the causal LM's train+evaluate runs
    encoder_runs = [r for r in found if r.data.tags.get("arm") == "encoder"]  # train_encoder's
    assert sorted(float(r.data.params["trainer.lr"]) for r in runs) == [1e-4, 3e-4]
    assert {r.data.tags["dvc.exp_name"] for r in runs} == {e["revs"][0]["name"] for e in exps}
    # trainer.lr is not an encoder param: train_encoder's inputs are the same in both experiments, and
    # the second (run after the first: one worker) takes it from DVC's run cache, so the encoder
    # trained (and logged a run) once, under the first experiment's name. When not, say which.
    locks = {e["revs"][0]["name"]: _lock_entry(repo, e["revs"][0]["rev"], "train_encoder") for e in exps}
    first, second = locks.values()
    assert first == second, f"train_encoder's inputs differ between the experiments: {_differences(locks)}"
    assert len(encoder_runs) == 1, f"{len(encoder_runs)} encoder runs; stages per experiment:\n{_stage_log(repo)}"
    assert encoder_runs[0].data.tags["dvc.exp_name"] in {e["revs"][0]["name"] for e in exps}
    assert all("eval_tuned/overall/score" in r.data.metrics for r in runs)


def _lock_entry(repo: Path, rev: str, stage: str) -> dict[str, Any]:
    """``stage``'s dvc.lock entry in commit ``rev``: its command, deps (with hashes) and params."""
    entry = yaml.safe_load(stdout_of(["git", "show", f"{rev}:dvc.lock"], repo))["stages"][stage]
    return {k: entry.get(k) for k in ("cmd", "deps", "params")}


def _differences(locks: dict[str, dict[str, Any]]) -> str:
    """The deps and params whose values differ between two lock entries, by experiment name."""
    (a_name, a), (b_name, b) = locks.items()
    deps_a, deps_b = ({d["path"]: d for d in e["deps"]} for e in (a, b))
    diff = [f"dep {p}: {deps_a.get(p)} vs {deps_b.get(p)}" for p in sorted(deps_a.keys() | deps_b.keys())
            if deps_a.get(p) != deps_b.get(p)]
    if a["params"] != b["params"]:
        diff.append(f"params: {a['params']} vs {b['params']}")
    if a["cmd"] != b["cmd"]:
        diff.append(f"cmd: {a['cmd']!r} vs {b['cmd']!r}")
    return f"({a_name} vs {b_name}) " + "; ".join(diff)


def _stage_log(repo: Path) -> str:
    """Each queued experiment's 'Running stage' / 'is cached' lines, from the queue's task logs."""
    logs = sorted((repo / ".dvc/tmp/exps/run").glob("*/*.out"), key=lambda p: p.stat().st_mtime)
    return "\n".join(f"{log.parent.name[:7]}: " + ", ".join(
        line.strip() for line in log.read_text(errors="replace").splitlines()
        if line.startswith("Running stage") or "is cached" in line) for log in logs)

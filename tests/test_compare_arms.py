"""``compare --arms``: the arms of one experiment side by side, from a folder, a git revision or an MLflow run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline import compare

# A hand-made evaluate output: two tasks, three LLM arms and an encoder that only scored the
# classification task; one difference without a p-value.
METRICS = {
    "base": {"qa": {"exact_match": 0.25, "token_f1": 0.5}, "topic": {"accuracy": 0.5, "macro_f1": 0.4},
             "overall": {"score": 0.375}},
    "base_kshot": {"qa": {"exact_match": 0.5, "token_f1": 0.6}, "topic": {"accuracy": 0.75, "macro_f1": 0.7},
                   "overall": {"score": 0.625}},
    "tuned": {"qa": {"exact_match": 1.0, "token_f1": 1.0}, "topic": {"accuracy": 1.0, "macro_f1": 1.0},
              "overall": {"score": 1.0}},
    "encoder": {"topic": {"accuracy": 0.875, "macro_f1": 0.8}, "overall": {"score": 0.875}},
    "safety": {"base": {"flagged_rate": 0.0, "flagged": 0}},
}


def _delta(d: float, low: float, high: float, p: float | None = 0.01) -> dict:
    return {"delta": d, "low": low, "high": high, **({"p_value": p} if p is not None else {})}


INTERVALS = {
    "intervals": {
        "base": {"qa": {"exact_match": [0.0, 0.5], "token_f1": [0.3, 0.7]},
                 "topic": {"accuracy": [0.25, 0.75], "macro_f1": [0.2, 0.6]}, "overall": {"score": [0.2, 0.5]}},
        "base_kshot": {"qa": {"exact_match": [0.25, 0.75], "token_f1": [0.4, 0.8]},
                       "topic": {"accuracy": [0.5, 1.0], "macro_f1": [0.5, 0.9]}, "overall": {"score": [0.5, 0.75]}},
        "tuned": {"qa": {"exact_match": [1.0, 1.0], "token_f1": [1.0, 1.0]},
                  "topic": {"accuracy": [1.0, 1.0], "macro_f1": [1.0, 1.0]}, "overall": {"score": [1.0, 1.0]}},
        "encoder": {"topic": {"accuracy": {"low": 0.625, "high": 1.0}, "macro_f1": [0.5, 1.0]},
                    "overall": {"score": [0.625, 1.0]}},
        "delta": {"qa": {"exact_match": _delta(0.75, 0.5, 1.0), "token_f1": _delta(0.5, 0.3, 0.7)},
                  "topic": {"accuracy": _delta(0.5, 0.25, 0.75), "macro_f1": _delta(0.6, 0.4, 0.8)},
                  "overall": {"score": _delta(0.625, 0.5, 0.8, p=0.002)}},
        "delta_tuned_vs_base_kshot": {"qa": {"exact_match": _delta(0.5, 0.25, 0.75, p=None)},
                                      "topic": {"accuracy": _delta(0.25, 0.0, 0.5)},
                                      "overall": {"score": _delta(0.375, 0.25, 0.5)}},
        "delta_tuned_vs_encoder": {"topic": {"accuracy": _delta(0.125, 0.0, 0.375, p=0.5),
                                             "macro_f1": _delta(0.2, 0.0, 0.5, p=0.25)}},
    },
    "task_types": {"qa": "short_answer", "topic": "classification"},
    "template_hash": "abc",
}


def _write_eval(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "intervals.json").write_text(json.dumps(INTERVALS))
    return folder


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


EXPECTED = [
    "| task | metric | base | base_kshot | tuned | encoder | tuned − base (95% CI, p) "
    "| tuned − base_kshot (95% CI, p) | tuned − encoder (95% CI, p) |",
    "| qa | exact_match | 0.250 [0.000, 0.500] | 0.500 [0.250, 0.750] | 1.000 [1.000, 1.000] | — "
    "| +0.750 [+0.500, +1.000], p=0.010 | +0.500 [+0.250, +0.750] | — |",
    "| topic | accuracy | 0.500 [0.250, 0.750] | 0.750 [0.500, 1.000] | 1.000 [1.000, 1.000] | 0.875 [0.625, 1.000] "
    "| +0.500 [+0.250, +0.750], p=0.010 | +0.250 [+0.000, +0.500], p=0.010 | +0.125 [+0.000, +0.375], p=0.500 |",
    "| topic | macro_f1 | 0.400 [0.200, 0.600] | 0.700 [0.500, 0.900] | 1.000 [1.000, 1.000] | 0.800 [0.500, 1.000] "
    "| +0.600 [+0.400, +0.800], p=0.010 | — | +0.200 [+0.000, +0.500], p=0.250 |",
    "| overall | score | 0.375 [0.200, 0.500] | 0.625 [0.500, 0.750] | 1.000 [1.000, 1.000] | 0.875 [0.625, 1.000] "
    "| +0.625 [+0.500, +0.800], p=0.002 | +0.375 [+0.250, +0.500], p=0.010 | — |",
]


def test_arms_of_one_folder_side_by_side_with_exact_cells(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _write_eval(tmp_path / "reports" / "eval")
    assert compare.main(["--arms", str(folder), "--plot", str(tmp_path / "unused.png")]) == 0
    out = capsys.readouterr().out
    assert _table_lines(out) == EXPECTED
    assert not (tmp_path / "unused.png").exists()  # one experiment: no parameter plot
    # --evals with a single folder is the same report
    assert compare.main(["--evals", str(folder)]) == 0
    assert _table_lines(capsys.readouterr().out) == EXPECTED


def test_arms_json_and_task_filter(tmp_path: Path) -> None:
    folder = _write_eval(tmp_path / "eval")
    out = tmp_path / "arms.json"
    assert compare.main(["--arms", str(folder), "--task", "qa", "--format", "json", "--out", str(out)]) == 0
    (table,) = json.loads(out.read_text())["arms"]
    assert table["arms"] == ["base", "base_kshot", "tuned", "encoder"]
    assert table["differences"] == ["tuned − base", "tuned − base_kshot", "tuned − encoder"]
    # --task: every metric of that task, then the overall score
    assert [(r["task"], r["metric"]) for r in table["rows"]] == [("qa", "exact_match"), ("qa", "token_f1"),
                                                                  ("overall", "score")]
    f1 = table["rows"][1]
    assert f1["arms"]["base_kshot"] == {"value": 0.6, "ci": [0.4, 0.8]}
    assert f1["arms"]["encoder"] is None
    assert f1["differences"]["tuned − base"] == {"delta": 0.5, "ci": [0.3, 0.7], "p_value": 0.01}
    assert f1["differences"]["tuned − base_kshot"] is None
    with pytest.raises(SystemExit, match="--task nope: .* has tasks qa, topic"):
        compare.main(["--arms", str(folder), "--task", "nope"])


def test_arms_of_a_git_revision_and_of_two(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = tmp_path / "repo"
    _write_eval(repo / "reports" / "eval")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "eval"], cwd=repo, check=True)
    METRICS_V2 = {**METRICS, "tuned": {**METRICS["tuned"], "overall": {"score": 0.5}}}
    (repo / "reports" / "eval" / "metrics.json").write_text(json.dumps(METRICS_V2))
    subprocess.run([*git, "commit", "-qam", "worse"], cwd=repo, check=True)
    assert compare.main(["--arms", "HEAD~1", "HEAD", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert out.count("## Arms of HEAD") == 2
    lines = _table_lines(out)
    assert lines[:5] == EXPECTED
    assert lines[9].startswith("| overall | score | 0.375 [0.200, 0.500] | 0.625 [0.500, 0.750] | 0.500 [1.000, 1.000]")


def test_arms_of_an_mlflow_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("arms", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(_write_eval(tmp_path / "eval")), artifact_path="eval")
    assert compare.main(["--arms", run.info.run_id, "--tracking-uri", uri, "--repo", str(tmp_path)]) == 0
    assert _table_lines(capsys.readouterr().out) == EXPECTED


def test_arms_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="has no intervals.json"):
        compare.main(["--arms", str(folder)])
    (folder / "intervals.json").write_text('{"intervals": {},\n "oops"}')
    with pytest.raises(SystemExit, match="intervals.json line 2: not JSON"):
        compare.main(["--arms", str(folder)])
    (folder / "intervals.json").write_text('{"intervals": {}}')
    with pytest.raises(SystemExit, match="intervals.json: no 'intervals' and 'task_types'"):
        compare.main(["--arms", str(folder)])

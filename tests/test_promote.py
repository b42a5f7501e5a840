"""``python -m pipeline.promote`` against a real SQLite MLflow store and a real export of the smoke model.

The training runs are made here with the tags train gives them and the evaluation artifacts evaluate
logs (``eval/predictions.jsonl``, ``eval/intervals.json``), with per-example scores chosen so that
one candidate is better than the champion beyond the paired interval and another is not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import export, promote
from pipeline.core.cli import guard
from pipeline.core.config import PipelineConfig
from pipeline.core.errors import PipelineError
from pipeline.params import compose, dump
from pipeline.tracking import registry
from pipeline.tracking.stage_run import DIGEST_TAG, model_digest

from test_export import make_tuned

N = 40  # examples per task: enough for a paired interval to exclude zero when one run is much better


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, smoke_cfg: PipelineConfig, smoke_data: Path,
             smoke_base: Path) -> tuple[Path, str]:
    """A real export of a LoRA adapter on the smoke model, and the digest of the trained folder."""
    root = tmp_path_factory.mktemp("exported")
    tuned = make_tuned(smoke_cfg, smoke_base, smoke_data / "rendered", root / "tuned")
    export.run(smoke_cfg, export.Paths(smoke_data / "rendered", smoke_base, tuned, root / "models" / "export",
                                       root / "check.json"))
    return root / "models" / "export", model_digest(tuned)


def _evaluation(correct: list[int], reference: str = "yes") -> tuple[list[dict], dict]:
    rows = [{"id": f"qa-{i}", "task": "qa", "prompt": f"q{i}", "reference": reference,
             "tuned_prediction": "yes" if c else "no", "tuned_scores": {"exact_match": float(c)}}
            for i, c in enumerate(correct)]
    intervals = {"task_types": {"qa": "short_answer"},
                 "intervals": {"delta": {"overall": {"score": {"delta": 0.25, "low": 0.1, "high": 0.4,
                                                               "p_value": 0.002, "test": "bootstrap", "n": N}}}}}
    return rows, intervals


def make_run(uri: str, tmp: Path, digest: str, correct: list[int], job_dir: Path | None = None,
             reference: str = "yes", **extra_tags: str) -> str:
    """A finished training run as train and evaluate leave it (with the overall score as its metric)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    tags = {"git.commit": "abc123", "git.dirty": "false", "data.hash": "d" * 16, "template.hash": "t" * 16,
            DIGEST_TAG: digest, **({"hydra.job_dir": str(job_dir)} if job_dir else {}), **extra_tags}
    run_id = mlf.start_run(uri, "instruction-tuning", tmp / "mlartifacts", {"seed": 42}, tags)
    rows, intervals = _evaluation(correct, reference)
    folder = tmp / f"eval-{run_id}"
    folder.mkdir()
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "intervals.json").write_text(json.dumps(intervals))
    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(folder), artifact_path="eval")
    client.log_metric(run_id, "eval_tuned/overall/score", sum(correct) / len(correct))  # evaluate's name for it
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _tags(uri: str, version: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_model_version("instruction-tuning", version).tags


def test_promote_registers_compares_and_refuses(tmp_path: Path, monkeypatch, capsys, smoke_cfg: PipelineConfig,
                                               exported: tuple[Path, str]) -> None:
    from mlflow.tracking import MlflowClient

    folder, digest = exported
    job = folder.parent.parent  # the Hydra job's folder: its models/export is the run's export
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    first = make_run(uri, tmp_path, digest, [1] * (N // 2) + [0] * (N // 2), job_dir=job)
    out = promote.run(smoke_cfg, promote.Selection(run_id=first), uri, tmp_path)
    assert out == {"version": "1", "registered": True, "gain_vs_champion": None}
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("instruction-tuning", registry.CHAMPION)
    assert str(champion.version) == "1" and champion.run_id == first
    tags = _tags(uri, "1")
    assert {tags["git.commit"], tags["data.hash"], tags["template.hash"], tags["run_id"]} == {
        "abc123", "d" * 16, "t" * 16, first}
    assert (tags["eval.tuned_minus_base.delta"], tags["eval.tuned_minus_base.low"],
            tags["eval.tuned_minus_base.high"]) == ("0.25", "0.1", "0.4")
    assert len(client.search_logged_models([client.get_experiment_by_name("instruction-tuning").experiment_id])) == 1
    assert set(client.get_run(first).data.params) == {"seed"}, "registering logs no params into the training run"

    # As good as the champion: refused, and nothing registered; --force registers it anyway.
    same = make_run(uri, tmp_path, digest, [1] * (N // 2) + [0] * (N // 2), job_dir=job)
    with pytest.raises(registry.PromotionRefused, match="not better than instruction-tuning@champion"):
        promote.run(smoke_cfg, promote.Selection(run_id=same), uri, tmp_path)
    assert len(client.search_model_versions("name='instruction-tuning'")) == 1
    params = tmp_path / "params.yaml"
    params.write_text(dump(compose(["+experiment=smoke"])))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the CLI's store: ./mlflow.db, this one
    assert guard("promote", lambda: promote.main(["--params", str(params), "--run-id", same])) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("promote: error:")]
    assert len(err) == 1 and "is not better than" in err[0] and "--force" in err[0]
    forced = promote.run(smoke_cfg, promote.Selection(run_id=same, force=True), uri, tmp_path)
    assert forced["version"] == "2" and _tags(uri, "2")["promote.forced"] == "true"

    # Better on the same examples beyond the paired interval: promoted, the alias moves.
    better = make_run(uri, tmp_path, digest, [1] * N, job_dir=job)
    done = promote.run(smoke_cfg, promote.Selection(run_id=better), uri, tmp_path)
    gain = done["gain_vs_champion"]
    assert done["version"] == "3" and gain["delta"] == pytest.approx(0.5) and gain["low"] > 0
    assert str(client.get_model_version_by_alias("instruction-tuning", registry.CHAMPION).version) == "3"
    assert float(_tags(uri, "3")["promote.vs_champion.low"]) > 0

    # The dethroned version 1's run forced back: the alias returns to version 1, no second copy.
    back = promote.run(smoke_cfg, promote.Selection(run_id=first, force=True), uri, tmp_path)
    assert back["version"] == "1" and not back["registered"]
    assert len(client.search_model_versions("name='instruction-tuning'")) == 3

    # Another test split (other references): cannot be paired, refused even with --force.
    other = make_run(uri, tmp_path, digest, [1] * N, job_dir=job, reference="no")
    with pytest.raises(registry.PromotionRefused, match="different test examples"):
        promote.run(smoke_cfg, promote.Selection(run_id=other, force=True), uri, tmp_path)


def test_the_registered_model_loads_and_generates(tmp_path: Path, monkeypatch, smoke_cfg: PipelineConfig,
                                                  exported: tuple[Path, str]) -> None:
    import mlflow

    folder, digest = exported
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    run_id = make_run(uri, tmp_path, digest, [1] * N)
    promote.run(smoke_cfg, promote.Selection(run_id=run_id, export=folder), uri, tmp_path)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/instruction-tuning/1")
    answer = model.predict({"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 5})
    text = answer[0]["choices"][0]["message"]["content"] if isinstance(answer, list) else \
        answer["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip()


def test_an_export_of_another_model_is_refused(tmp_path: Path, smoke_cfg: PipelineConfig,
                                               exported: tuple[Path, str]) -> None:
    folder, _ = exported
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = make_run(uri, tmp_path, "another-digest", [1] * N)
    with pytest.raises(PipelineError, match="export of another model"):
        promote.run(smoke_cfg, promote.Selection(run_id=run_id, export=folder), uri, tmp_path)
    cfg = dataclasses.replace(smoke_cfg, export=dataclasses.replace(smoke_cfg.export, registered_model="other"))
    with pytest.raises(PipelineError, match="does not exist"):  # the default: the workspace's export, none here
        promote.run(cfg, promote.Selection(), uri, tmp_path)


def test_a_sweeps_best_child_and_a_dvc_experiment_by_name(tmp_path: Path, smoke_cfg: PipelineConfig,
                                                          exported: tuple[Path, str]) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import runs as mlf

    folder, digest = exported
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = mlf.start_run(uri, "instruction-tuning", tmp_path / "mlartifacts",
                           {"sweep.metric": "eval.tuned.overall.score", "sweep.direction": "maximize"}, {})
    children = [make_run(uri, tmp_path, digest, [1] * k + [0] * (N - k), **{mlf.PARENT_TAG: parent})
                for k in (10, 30, 20)]
    out = promote.run(smoke_cfg, promote.Selection(sweep=parent, export=folder), uri, tmp_path)
    assert MlflowClient(uri).get_model_version("instruction-tuning", out["version"]).run_id == children[1]
    named = make_run(uri, tmp_path, digest, [1] * N, **{"dvc.exp_name": "lucky-fawn"})
    out = promote.run(smoke_cfg, promote.Selection(exp="lucky-fawn", export=folder), uri, tmp_path)
    assert MlflowClient(uri).get_model_version("instruction-tuning", out["version"]).run_id == named
    with pytest.raises(PipelineError, match="not a sweep's parent"):
        promote.run(smoke_cfg, promote.Selection(sweep=named, export=folder), uri, tmp_path)

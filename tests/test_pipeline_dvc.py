"""The whole spine, for real: `dvc exp run -S +experiment=smoke` in a temporary git repo, and the
same experiment through the Hydra app (`python -m pipeline`) in the same repo.

Checks the files every stage produces, the metric keys, that training changed the
adapter, the MLflow run (params, tags, metrics, artifacts) through the MLflow client,
that a second `dvc repro` does nothing, and that both runners write byte-identical outputs
with a safety rule list that hits rows and a ``prompt.template_file`` in play.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweep_helpers import copy_checkout

REPO = Path(__file__).resolve().parents[1]
# Written into the temporary repo: a keyword some embedded rows hold (prepare quarantines them,
# evaluate reviews every answer for it), and a template file.
KEYWORDS = "conf/safety/lists/smoke_keywords.txt"
TEMPLATE = "conf/prompt/smoke_template.jinja"
OVERRIDES = ["+experiment=smoke", f"safety.keywords_file={KEYWORDS}", "prompt=plain", f"prompt.template_file={TEMPLATE}"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    return env


def _sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    copy_checkout(repo)
    (repo / KEYWORDS).write_text("glasgow\n", encoding="utf-8")
    (repo / TEMPLATE).write_text("Task: {{ instruction }}\n{% if input %}Input: {{ input }}\n{% endif %}Answer:",
                                 encoding="utf-8")
    _sh(["git", "init", "-q"], repo)
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "init"], repo)
    _sh([sys.executable, "-m", "dvc", "exp", "run", *[a for o in OVERRIDES for a in ("-S", o)]], repo)
    return repo


@pytest.fixture(scope="module")
def app_job(smoke_repo: Path) -> Path:
    """The same experiment through the Hydra app, in the same repo; its job folder."""
    _sh([sys.executable, "-m", "pipeline", *OVERRIDES, "hydra.run.dir=outputs/app"], smoke_repo)
    return smoke_repo / "outputs" / "app"


def _files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) by its relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_both_runners_write_the_same_bytes_with_the_filter_the_review_and_the_template(
        smoke_repo: Path, app_job: Path) -> None:
    """Every output dvc.lock records, written by `dvc exp run`, equals the app's byte for byte: the
    same stages, the same inputs, no run id or timing in any output (so a re-run cannot change
    dvc.lock either)."""
    import yaml

    lock = yaml.safe_load((smoke_repo / "dvc.lock").read_text())["stages"]
    homes = {name: Path(p) for name, p in json.loads((app_job / "stages.json").read_text()).items()}
    homes.update(train=app_job, align=app_job, evaluate=app_job, export=app_job)
    assert set(homes) == set(lock), "both runners run the same stages"
    for stage, entry in lock.items():
        for out in entry.get("outs", []):
            dvc_side, app_side = _files(smoke_repo / out["path"]), _files(homes[stage] / out["path"])
            assert dvc_side and dvc_side.keys() == app_side.keys(), (stage, out["path"])
            differ = [name for name in dvc_side if dvc_side[name] != app_side[name]]
            assert not differ, (stage, out["path"], differ)
    # What made those equal outputs worth comparing: both applied the safety filter and the output
    # review, and both rendered with the template file's text.
    stats = json.loads((smoke_repo / "reports/prepare/stats.json").read_text())
    assert stats["safety"]["quarantined"] > 0 and stats["safety"]["by_rule"] == {
        "keyword:glasgow": stats["safety"]["quarantined"]}
    metrics = json.loads((smoke_repo / "reports/eval/metrics.json").read_text())
    assert set(metrics["safety"]) == {"base", "base_kshot", "tuned"}
    template = json.loads((smoke_repo / "data/rendered/template.json").read_text())
    assert template["template"] == (smoke_repo / TEMPLATE).read_text()


def test_every_stage_writes_its_outputs(smoke_repo: Path) -> None:
    expected = [
        "models/base/model.safetensors", "models/base/tokenizer.json", "models/base/chat_template.jinja",
        "data/prepared/train.jsonl", "data/prepared/val.jsonl", "data/prepared/test.jsonl",
        "reports/prepare/stats.json", "data/rendered/train.jsonl", "data/rendered/template.json",
        "reports/render/report.json", "models/finetuned/adapter/adapter_model.safetensors",
        "models/finetuned/template.json", "models/finetuned/config.yaml", "models/finetuned/summary.json",
        "reports/train/train_loss.csv", "reports/train/val_loss.csv", "reports/train/loss.png",
        "reports/eval/headline.json", "reports/eval/metrics.json", "reports/eval/intervals.json", "reports/eval/predictions.jsonl",
        "reports/eval/report.md", "reports/eval/plots/per_task.png", "reports/eval/plots/confusion_topic.png",
        "reports/eval/per_task.json", "reports/eval/confusion/topic_base.json", "reports/eval/confusion/topic_tuned.json",
        # the encoder arm, trained by its own stage on the same prepared splits
        "models/encoder/model/model.safetensors", "models/encoder/labels.json", "models/encoder/summary.json",
        "reports/train_encoder/train_loss.csv", "reports/eval/confusion/topic_encoder.json",
        "reports/eval/plots/confusion_topic_encoder.png",
        # the merged export, checked against the adapter's logits
        "models/export/model.safetensors", "models/export/tokenizer.json", "models/export/generation_config.json",
        "reports/export/check.json",
    ]
    missing = [p for p in expected if not (smoke_repo / p).is_file()]
    assert not missing, missing
    # The smoke override reached every stage through the composed params.yaml.
    info = json.loads((smoke_repo / "models/base/model_info.json").read_text())
    assert info["num_hidden_layers"] == 2 and info["init"] == "random"


def test_metric_keys_per_model_and_task(smoke_repo: Path) -> None:
    metrics = json.loads((smoke_repo / "reports/eval/metrics.json").read_text())
    assert set(metrics) == {"base", "base_kshot", "tuned", "encoder", "delta", "delta_tuned_vs_base_kshot",
                            "delta_base_kshot_vs_base", "delta_tuned_vs_encoder", "safety"}
    assert set(metrics["encoder"]) == set(metrics["delta_tuned_vs_encoder"]) == {"topic"}  # classification only
    for model in ("base", "base_kshot", "tuned"):
        assert set(metrics[model]) == {"topic", "qa", "past_tense", "summary", "overall"}
        assert {"accuracy", "macro_f1", "unmatched_rate", "perplexity", "accuracy_loglik",
                "macro_f1_loglik"} <= set(metrics[model]["topic"])
        assert {"exact_match", "token_f1", "perplexity"} <= set(metrics[model]["qa"])
        assert {"rougeL", "rouge1", "rouge2", "bleu", "chrf"} <= set(metrics[model]["summary"])
    assert metrics["delta"]["topic"]["accuracy"] == pytest.approx(
        metrics["tuned"]["topic"]["accuracy"] - metrics["base"]["topic"]["accuracy"])
    rows = [json.loads(line) for line in (smoke_repo / "reports/eval/predictions.jsonl").read_text().splitlines()]
    test_rows = (smoke_repo / "data/prepared/test.jsonl").read_text().splitlines()
    assert len(rows) == len(test_rows)
    assert {"id", "task", "prompt", "reference", "base_prediction", "tuned_prediction", "tuned_scores"} <= set(rows[0])


def test_training_changed_the_adapter(smoke_repo: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(smoke_repo / "models/finetuned/adapter/adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b, "no LoRA B matrices saved"
    # peft initialises every B matrix to zero: a non-zero B means the optimizer moved it.
    assert all(v.abs().sum() > 0 for v in lora_b.values())


def test_mlflow_run_has_params_tags_metrics_artifacts(smoke_repo: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import stage_run

    client = MlflowClient(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    digest = stage_run.model_digest(smoke_repo / "models/finetuned")
    exp = client.get_experiment_by_name("instruction-tuning")
    # The app's job (if it ran) trained the same bytes: the DVC experiment's run is the one it named.
    [run] = [r for r in client.search_runs([exp.experiment_id], f"tags.`{stage_run.DIGEST_TAG}` = '{digest}'")
             if "dvc.exp_name" in r.data.tags]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "6"
    assert run.data.params["model.config_overrides.num_hidden_layers"] == "2"
    assert run.data.params["finetune.method"] == "lora"
    tags = run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=smoke_repo, capture_output=True, text=True).stdout
    assert tags["git.commit"] == head.strip()
    assert tags["git.dirty"] in ("true", "false")
    assert len(tags["data.hash"]) == 64
    assert tags["template.hash"] == json.loads((smoke_repo / "data/rendered/template.json").read_text())["hash"]
    assert tags.get("dvc.exp_name"), "dvc exp run should name the run's experiment"
    metrics = run.data.metrics
    # Named in sections (MLflow's chart view groups by the first "/"): step curves, each arm, the differences.
    for key in ("train/loss", "val/loss", "train/lr", "train/tokens_per_s", "eval_tuned/topic/accuracy",
                "eval_base/topic/accuracy", "delta/tuned_vs_base/overall/score", "eval_tuned/qa/perplexity"):
        assert key in metrics, key
    assert not [k for k in metrics if "/" not in k], "every metric in a section"
    history = client.get_metric_history(run_id, "train/loss")
    assert len(history) == 6
    # The DVC loss curve holds every validation (after optimizer steps 3 and 6), each with the value
    # MLflow logged then (Lightning's logger numbers steps from 0: step s is logged at s - 1).
    val_csv = (smoke_repo / "reports/train/val_loss.csv").read_text().split()[1:]
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss")}
    assert [int(r.split(",")[0]) for r in val_csv] == [3, 6]
    assert set(logged) == {2, 5}
    for row in val_csv:
        step, loss = row.split(",")
        assert float(loss) == pytest.approx(logged[int(step) - 1], rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "template.json", "plots", "eval"} <= artifacts
    eval_files = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert "eval/predictions.json" in eval_files and "eval/metrics.json" in eval_files
    assert "| tuned − base | overall | score |" in tags["mlflow.note.content"]  # the headline as description


def test_mlflow_run_has_its_datasets_and_its_adapter_as_a_logged_model(smoke_repo: Path) -> None:
    """The run page's Datasets panel (train, val, test with the pipeline's hashes) and Logged models
    (the adapter alone, its params, and the tuned model's eval metrics pointing to it)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from pipeline.core.files import hash_files
    from pipeline.tracking import stage_run

    client = MlflowClient(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instruction-tuning")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    digest = stage_run.model_digest(smoke_repo / "models/finetuned")
    [run] = [r for r in client.search_runs([exp.experiment_id], f"tags.`{stage_run.DIGEST_TAG}` = '{digest}'")
             if "dvc.exp_name" in r.data.tags]
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs
              if d.tags}  # mlflow.genai.evaluate's own table (no context) aside
    assert set(inputs) == {"train", "val", "test"}, inputs
    for split, dataset in inputs.items():
        assert dataset.digest == hash_files([smoke_repo / f"data/rendered/{split}.jsonl"])[:36], split
    model = client.get_logged_model(run.data.tags["pipeline.model_id"])
    assert model.source_run_id == run.info.run_id and model.status == LoggedModelStatus.READY
    assert model.params["finetune.method"] == "lora" and model.model_type == "lora adapter"
    files = {a.path for a in client.list_artifacts(run.info.run_id)} | set(_model_files(model.artifact_location))
    assert "adapter_model.safetensors" in files and "adapter" not in files, "the adapter is stored once"
    stored = sum(f.stat().st_size for f in Path(model.artifact_location.removeprefix("file://")).rglob("*"))
    assert stored <= 2 * (smoke_repo / "models/finetuned/adapter/adapter_model.safetensors").stat().st_size
    assert {m.key for m in model.metrics or []} >= {"eval_tuned/topic/accuracy", "delta/tuned_vs_base/overall/score"}


def _model_files(location: str) -> list[str]:
    return [p.name for p in Path(location.removeprefix("file://")).rglob("*") if p.is_file()]


def test_promote_registers_the_experiments_export(smoke_repo: Path) -> None:
    """After `dvc exp run`, `python -m pipeline.promote` registers models/export (merged by the export
    stage, which logged nothing: the store held no merged weights before) with its lineage, and the
    registered version generates."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import stage_run

    merged = (smoke_repo / "models/export/model.safetensors").read_bytes()
    logged = list((smoke_repo / "mlartifacts").rglob("*.safetensors"))  # the adapters, the encoder arm
    assert logged and not [p for p in logged if p.read_bytes() == merged], "dvc repro logged the merged model"
    _sh([sys.executable, "-m", "pipeline.promote"], smoke_repo)
    uri = f"sqlite:///{smoke_repo / 'mlflow.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("instruction-tuning", "champion")
    run = client.get_run(version.run_id)
    assert run.data.tags[stage_run.DIGEST_TAG] == stage_run.model_digest(smoke_repo / "models/finetuned")
    assert run.data.tags.get("dvc.exp_name")
    for key in ("git.commit", "data.hash", "template.hash"):
        assert version.tags[key] == run.data.tags[key], key
    delta = json.loads((smoke_repo / "reports/eval/intervals.json").read_text())["intervals"]["delta"]["overall"]
    assert float(version.tags["eval.tuned_minus_base.low"]) == pytest.approx(delta["score"]["low"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/instruction-tuning/{version.version}")
    [reply] = model.predict({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4})
    assert isinstance(reply["choices"][0]["message"]["content"], str)


def test_dvc_plots_show_renders_eval_plots(smoke_repo: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=smoke_repo, env=_env(),
                          capture_output=True, text=True, check=True)
    shown = json.loads(proc.stdout)["data"]
    for model in ("base", "base_kshot", "tuned"):
        [confusion] = shown[f"reports/eval/confusion/topic_{model}.json"]
        encoding = confusion["content"]["spec"]["encoding"]
        assert (encoding["x"]["field"], encoding["y"]["field"]) == ("actual", "predicted")
    [bars] = shown["reports/eval/per_task.json"]
    assert bars["content"]["mark"]["type"] == "bar"
    assert {row["bar"] for row in bars["content"]["data"]["values"]} == {
        f"{t} · {m}" for t in ("topic", "qa", "past_tense", "summary") for m in ("base", "base_kshot", "tuned")} | {
        "topic · encoder"}
    [slice_bars] = shown["reports/eval/slices.json"]
    assert {row["model"] for row in slice_bars["content"]["data"]["values"]} == {"base", "base_kshot", "tuned"}
    assert "reports/eval/plots/per_task.png" in shown


def test_second_repro_is_a_no_op(smoke_repo: Path) -> None:
    out = _sh([sys.executable, "-m", "dvc", "repro"], smoke_repo)
    assert "Running stage" not in out
    status = _sh([sys.executable, "-m", "dvc", "status"], smoke_repo)
    assert "up to date" in status


def test_eval_change_does_not_retrain(smoke_repo: Path) -> None:
    out = _sh([sys.executable, "-m", "dvc", "exp", "run", *[a for o in OVERRIDES for a in ("-S", o)],
               "-S", "eval.batch_size=4"], smoke_repo)
    assert "Running stage 'evaluate'" in out
    for stage in ("base_model", "prepare", "render", "train", "train_encoder", "export"):
        assert f"Running stage '{stage}'" not in out
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=smoke_repo, env=_env(),
                          capture_output=True, text=True, check=True)
    shown = json.dumps(json.loads(proc.stdout))
    assert '"eval.batch_size"' in shown or '"batch_size": 4' in shown, "dvc exp show lists the new experiment"


CHROMIUM = Path("/usr/bin/chromium")


def _look(url: str, shot: Path, profile: Path) -> str:
    """A headless Chromium screenshot of ``url`` into ``shot``; returns the page's text (the DOM, tags removed)."""
    import re

    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1600,1400"]
    subprocess.run([*cmd, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    dom = subprocess.run([*cmd, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    shot.with_suffix(".txt").write_text(text, encoding="utf-8")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
    return text


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                  "(apt-get install -y chromium)")
def test_mlflow_ui_shows_sections_datasets_logged_model_and_per_example_traces(
        smoke_repo: Path, app_job: Path, tmp_path: Path) -> None:
    """A real `mlflow server` over the smoke store, looked at in headless Chromium: the run page shows
    its headline description, datasets and the adapter as the model its metrics belong to; its charts
    come in sections (train, val, eval_<arm>/<task>, delta/...); two runs compare side by side; the
    run's traces hold the per-example scores. Screenshots and page text stay in the test's tmp folder
    (copied to $UI_SHOTS when set)."""
    import os
    import shutil

    from mlflow.tracking import MlflowClient

    from sweep_helpers import mlflow_server

    client = MlflowClient(f"sqlite:///{smoke_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instruction-tuning")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "pipeline.model_id" in r.data.tags
            and r.data.tags.get("arm") != "encoder"]
    a, b = runs[0].info.run_id, runs[1].info.run_id  # the DVC experiment's and the app job's
    base = f"#/experiments/{exp.experiment_id}"
    # MLflow 3.17's UI picks GenAI or model-training view from its own switch (default GenAI, kept in
    # the browser; ?workflowType= sets it), not from the experiment's mlflow.experimentKind tag.
    pages = {"experiment": f"{base}?workflowType=machine_learning", "run": f"{base}/runs/{a}",
             "charts": f"{base}/runs/{a}/model-metrics", "traces": f"{base}/runs/{a}/traces",
             "traces_compared": f"{base}/runs/{a}/traces?compareToRunUuid={b}",
             "compare": f'#/compare-runs?runs=["{a}","{b}"]&experiments=["{exp.experiment_id}"]',
             "evaluation_runs": f"{base}/evaluation-runs?selectedRunUuid={a}&compareToRunUuid={b}"}
    (tmp_path / "profile").mkdir()
    with mlflow_server(["--backend-store-uri", f"sqlite:///{smoke_repo / 'mlflow.db'}"], smoke_repo,
                       tmp_path / "server.log", _env(), timeout=120) as url:
        text = {name: _look(f"{url}/{page}", tmp_path / f"{name}.png", tmp_path / "profile")
                for name, page in pages.items()}
    if os.environ.get("UI_SHOTS"):
        shutil.copytree(tmp_path, os.environ["UI_SHOTS"], dirs_exist_ok=True, ignore=shutil.ignore_patterns("profile"))
    run, charts = text["run"], text["charts"]
    assert "Headline (95% intervals, paired p-values)" in run and "tuned − base" in run, run[:3000]
    assert "Datasets train (" in run and "Logged models" in run and "adapter" in run, run[:3000]
    for section in ("train (4)", "val (1)", "eval_tuned/topic (", "delta/tuned_vs_base/overall ("):
        assert section in charts, (section, charts[:3000])
    assert "Comparing 2 Runs" in text["compare"] and "train/loss" in text["compare"]
    # Example by example: each trace's request, answer, expected output and score, beside another run's.
    for name in ("traces", "traces_compared"):
        assert "compare to" in text[name] and "Expected output" in text[name] and "correct" in text[name], name
    assert "8 of 8" in text["traces"], "one trace per test row of the smoke split"

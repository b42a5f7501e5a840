"""Secrets never reach MLflow, stdout or the sweep files (RELIABILITY.md, issue 24).

Each test gives a secret the way a user would (a Hydra override, a URL, a config key
under a common name) and reads back what a real SQLite (or HTTP) store recorded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.core.config import ConfigError
from pipeline.params import compose
from pipeline.tracking import runs
from pipeline.tracking.runs import REDACTED, is_secret_key, params_for_logging, redact_overrides, redact_tree
from pipeline.tracking.sweeps import Objective, Parent, summarize, sweep_definition

SECRET = "sk-live-123"


@pytest.mark.parametrize("key", ["hubToken", "auth", "Authorization", "passphrase", "access_key_id",
                                 "private_key_file", "hub_token", "api_key", "password", "aws_secret_access_key",
                                 "HF_TOKEN", "clientSecret", "db-password", "credentials", "safety.classifier.apiKey"])
def test_common_secret_names_are_secret(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["num_key_value_heads", "keywords", "keywords_file", "regex_file", "pad_token",
                                 "pad_token_id", "max_new_tokens", "eos_token", "author", "tokenizer", "key_value",
                                 "monkey", "data.columns.keywords", "include_instruction"])
def test_ordinary_names_are_not(key: str) -> None:
    assert not is_secret_key(key)


def test_no_shipped_config_value_is_redacted() -> None:
    """Redaction has no false positives on anything conf/ composes (templates, paths, lists)."""
    for overrides in ([], ["+experiment=smoke"], ["data=mixture"], ["trainer=fsdp"], ["prompt=alpaca"],
                      ["prompt=chatml"], ["prompt=plain"], ["encoder=none"]):
        raw = compose(overrides)
        assert redact_tree(raw) == raw, overrides


def test_credentials_in_values_and_lists_are_redacted() -> None:
    params = {"tracking": {"store": "postgresql://alice:pw123@db.example/mlflow"},
              "data": {"sources": [{"name": "a", "path": "https://bob:tok456@example.org/a.jsonl", "hubToken": "hf_x"},
                                   {"name": "b", "headers": {"Authorization": "Bearer abcdefghijkl"}}]},
              "model": {"path": "s3://bucket/model", "gguf_file": None, "auth": True}}
    flat = params_for_logging(params)
    logged = " ".join(flat.values())
    for secret in ("pw123", "tok456", "hf_x", "abcdefghijkl", "alice", "bob"):
        assert secret not in logged, secret
    assert flat["model.path"] == "s3://bucket/model" and flat["model.auth"] == "True"  # a flag is no secret
    assert "db.example/mlflow" in flat["tracking.store"]  # what is not a credential stays readable
    assert "'name': 'a'" in flat["data.sources"]


def test_override_strings_are_redacted() -> None:
    dirname = f"+safety.classifier.api_key={SECRET},trainer.lr=1e-3"
    assert redact_overrides(dirname) == f"+safety.classifier.api_key={REDACTED},trainer.lr=1e-3"
    joined = f"trainer.lr=1e-4,3e-4 +safety.classifier.api_key={SECRET} model.hubToken=abc"
    assert redact_overrides(joined) == f"trainer.lr=1e-4,3e-4 +safety.classifier.api_key={REDACTED} model.hubToken={REDACTED}"
    inline = "+safety.classifier={_target_:m.f,api_key:" + SECRET + "}"
    assert SECRET not in redact_overrides(inline) and "_target_:m.f" in redact_overrides(inline)


def _hydra_config(overrides: list[str]) -> object:
    return OmegaConf.create({"hydra": {"overrides": {"task": overrides},
                                       "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
                                       "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}})


def test_the_sweep_parent_logs_no_secret_from_its_overrides(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    overrides = ["trainer.lr=1e-3,3e-3", f"+safety.classifier.api_key={SECRET}"]
    definition = sweep_definition(_hydra_config(overrides), Objective("eval.tuned.overall.score", "maximize"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = runs.start_run(uri, "e", tmp_path / "art", definition, {"sweep.id": "s"},
                            run_name=f"+safety.classifier.api_key={SECRET}")
    run = MlflowClient(uri).get_run(run_id)
    assert SECRET not in repr(run.data.params) + run.info.run_name
    assert run.data.params["sweep.overrides"] == f"trainer.lr=1e-3,3e-3 +safety.classifier.api_key={REDACTED}"
    assert run.data.params["sweep.override.safety.classifier.api_key"] == REDACTED

    # multirun.yaml (Hydra writes the overrides into it) is uploaded redacted.
    sweep_dir = tmp_path / "multirun"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": overrides}, "job": {"override_dirname": f"+safety.classifier.api_key={SECRET}"}},
         "safety": {"classifier": {"_target_": "m.f", "api_key": SECRET}}}))
    summarize(Parent(run_id, "s", uri), Objective("m", "maximize"), sweep_dir)
    local = MlflowClient(uri).download_artifacts(run_id, "sweep/multirun.yaml", str(tmp_path / "down"))
    text = Path(local).read_text()
    assert SECRET not in text and REDACTED in text
    assert yaml.safe_load(text)["hydra"]["overrides"]["task"][0] == "trainer.lr=1e-3,3e-3"


def _hydra_runtime(tmp_path: Path, output_dir: Path, dirname: str) -> SimpleNamespace:
    from hydra.types import RunMode

    return SimpleNamespace(mode=RunMode.RUN, sweep=SimpleNamespace(dir=str(tmp_path / "multirun")), callbacks=None,
                           job=SimpleNamespace(override_dirname=dirname, num=0),
                           runtime=SimpleNamespace(output_dir=str(output_dir)))


def test_a_job_run_name_never_holds_a_secret_and_the_job_dir_is_never_the_repo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.app import REPO_ROOT, job_context

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = job_context(_hydra_runtime(tmp_path, tmp_path / "job", f"+safety.classifier.api_key={SECRET}"), tmp_path)
    assert ctx.tracking.run_name == f"+safety.classifier.api_key={REDACTED}"
    for bad in (tmp_path, REPO_ROOT, tmp_path.parent):  # hydra.run.dir=. (or the repository, or above it)
        with pytest.raises(ConfigError, match="hydra.run.dir"):
            job_context(_hydra_runtime(tmp_path, bad, ""), tmp_path)


@pytest.mark.parametrize("uri", ["http://alice:pw123@mlflow.example", "https://alice:pw123@mlflow.example:5000/x",
                                 "https://tokenonly-pw123@mlflow.example", "postgresql://alice:pw123@db/mlflow"])
def test_a_tracking_uri_with_credentials_is_refused(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError) as info:
        runs.Tracking.from_env(tmp_path)
    [problem] = info.value.problems
    assert "pw123" not in str(info.value) and problem.startswith("MLFLOW_TRACKING_URI: credentials")
    if uri.startswith("http"):
        assert "MLFLOW_TRACKING_USERNAME" in problem and "MLFLOW_TRACKING_PASSWORD" in problem


@pytest.mark.parametrize("uri", ["http://mlflow.example:5000", "databricks://profile", "sqlite:////tmp/x/mlflow.db",
                                 "postgresql://alice@db/mlflow", "file:///tmp/mlruns"])
def test_a_tracking_uri_without_a_secret_is_kept(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert runs.Tracking.from_env(tmp_path).uri == uri


def test_mlflow_prints_no_run_url(tmp_path: Path) -> None:
    """Against a real server: ending a run (fluent or client) prints no ``View run ... at: <url>``."""
    from sweep_helpers import env, mlflow_server

    environ = env()  # this checkout's code, no MLFLOW_ settings from the caller
    store = ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"]
    script = textwrap.dedent("""
        from pathlib import Path
        from pipeline.tracking import runs
        t = runs.Tracking.from_env(Path.cwd())
        run_id = runs.start_run(t.uri, "e", t.artifact_root, {"a": 1}, {})
        with runs.active_run(t.uri, run_id):
            pass
        print("done", run_id)
    """)
    with mlflow_server(store, tmp_path, tmp_path / "server.log", environ) as url:
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              env={**environ, "MLFLOW_TRACKING_URI": url}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done" in proc.stdout
    assert "View run" not in proc.stdout + proc.stderr and url not in proc.stdout + proc.stderr


def test_redacted_yaml_is_what_a_stage_uploads() -> None:
    raw = compose(["+experiment=smoke"])
    raw["safety"]["classifier"] = {"_target_": "m.f", "api_key": SECRET, "url": "https://u:p4ss@h/x"}
    text = runs.redacted_yaml(raw)
    assert SECRET not in text and "p4ss" not in text
    back = yaml.safe_load(text)
    assert back["safety"]["classifier"]["api_key"] == REDACTED and back["trainer"] == raw["trainer"]


def test_both_training_stages_save_their_config_redacted(tmp_path) -> None:
    """train and train_encoder write config.yaml (also uploaded to MLflow) through fit.save."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tracking.runs import REDACTED
    from pipeline.training import fit

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    params = {"encoder": {"model": {"config_overrides": {"hubToken": "sk-live-1234567890abcdef"}}}, "seed": 0}
    fit.save(tmp_path / "out", tiny, "model", params, {"summary.json": {"steps": 0}})
    text = (tmp_path / "out" / "config.yaml").read_text()
    assert "sk-live-1234567890abcdef" not in text and REDACTED in text
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()

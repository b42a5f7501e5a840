"""Clear failures, secrets kept out of MLflow, determinism and parallel writers (RELIABILITY.md).

Each failure test runs the real stage entry point in a subprocess and checks that the
user gets one `<stage>: error: ...` line and no traceback, and that nothing is written.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import prepared_workdir
from pipeline import evaluate, train
from pipeline.tracking import stage_run
from pipeline.core.config import from_mapping
from pipeline.params import compose
from pipeline.tracking.runs import REDACTED, params_for_logging, redact_tree

SMOKE = ["+experiment=smoke"]


def _stage(args: list[str], cwd: Path, preexec=None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          preexec_fn=preexec, timeout=300)


def _assert_one_clear_error(proc: subprocess.CompletedProcess, stage: str, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{stage}: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory, smoke_base: Path) -> Path:
    """params.yaml, prepared and rendered smoke data next to a link to the smoke model."""
    return prepared_workdir(tmp_path_factory.mktemp("reliability"), compose(SMOKE), smoke_base)


def _train_args(base: str, out: str) -> list[str]:
    return ["pipeline.train", "--rendered", "rendered", "--base-model", base, "--out", out,
            "--curves", f"{out}-curves", "--checkpoints", f"{out}-ckpt"]


def test_missing_base_model_file(smoke_dir: Path) -> None:
    broken = smoke_dir / "no-weights"
    broken.mkdir()
    for f in (smoke_dir / "base").iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    proc = _stage(_train_args("no-weights", "out-missing"), smoke_dir)
    _assert_one_clear_error(proc, "train", "cannot load the model in no-weights", "base_model stage")
    assert not (smoke_dir / "out-missing").exists()


@pytest.mark.slow  # a training subprocess and its MLflow store, end to end
def test_a_corrupt_adapter_fails_evaluate_in_one_line_and_marks_its_run_failed(smoke_dir: Path) -> None:
    """Evaluate opens its MLflow run before anything that can fail: a failure ends it FAILED, not FINISHED."""
    from mlflow.tracking import MlflowClient

    proc = _stage(_train_args("base", "good"), smoke_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = smoke_dir / "good" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])  # truncated, as by a full disk or an interrupted copy
    proc = _stage(["pipeline.evaluate", "--rendered", "rendered", "--prepared", "prepared", "--base-model", "base",
                   "--tuned", "good", "--out", "eval-corrupt"], smoke_dir)
    _assert_one_clear_error(proc, "evaluate", "cannot load the LoRA adapter in good/adapter", "re-run the train stage")
    client = MlflowClient(f"sqlite:///{smoke_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instruction-tuning")
    [run] = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'evaluate-%'")
    assert run.info.status == "FAILED"  # its digest matches no training run: evaluate opened its own, then failed
    assert not (smoke_dir / "eval-corrupt").exists()


@pytest.mark.slow  # a training subprocess and its MLflow store, end to end
def test_a_diverging_training_run_stops_in_one_line_and_marks_its_run_failed(smoke_dir: Path) -> None:
    """A finite but absurd learning rate blows the loss up: the stage stops at that step (exit 1, one
    line naming it) instead of training on to max_steps and exiting 0 with NaN weights."""
    from mlflow.tracking import MlflowClient

    (smoke_dir / "diverge.yaml").write_text(yaml.safe_dump(compose([*SMOKE, "trainer.lr=1e30"]), sort_keys=False))
    proc = _stage([*_train_args("base", "out-nan")[:1], "--params", "diverge.yaml", *_train_args("base", "out-nan")[1:]],
                  smoke_dir)
    _assert_one_clear_error(proc, "train", "training loss is", "lower trainer.lr")
    assert not (smoke_dir / "out-nan").exists()
    client = MlflowClient(f"sqlite:///{smoke_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instruction-tuning")
    [run] = client.search_runs([exp.experiment_id], "params.`trainer.lr` = '1e+30'")
    assert run.info.status == "FAILED"


def test_corrupt_base_model_file(smoke_dir: Path) -> None:
    broken = smoke_dir / "corrupt"
    broken.mkdir()
    for f in (smoke_dir / "base").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:1000] if f.name == "model.safetensors" else data)
    proc = _stage(_train_args("corrupt", "out-corrupt"), smoke_dir)
    _assert_one_clear_error(proc, "train", "cannot load the model in corrupt", "SafetensorError")


def test_tokenizer_that_does_not_match_the_model(smoke_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = smoke_dir / "mismatch"
    small = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(small).save_pretrained(other)
    AutoTokenizer.from_pretrained(smoke_dir / "base").save_pretrained(other)  # 49152 tokens, 1000 rows
    (other / "model_info.json").write_text((smoke_dir / "base/model_info.json").read_text())
    proc = _stage(_train_args("mismatch", "out-mismatch"), smoke_dir)
    _assert_one_clear_error(proc, "train", "49152 tokens", "1000 embedding rows")


def test_unwritable_output_directory(smoke_dir: Path) -> None:
    (smoke_dir / "a-file").write_text("not a directory")
    proc = _stage(["pipeline.prepare", "--out", "a-file/prepared", "--stats", "a-file/stats.json"], smoke_dir)
    _assert_one_clear_error(proc, "prepare", "cannot write or read", "a-file")


def test_full_disk_leaves_no_partial_output(smoke_dir: Path) -> None:
    """Simulated with a file-size limit: every write past 4 KiB fails as on a full disk."""
    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = _stage(["pipeline.prepare", "--out", "full/prepared", "--stats", "full/stats.json"], smoke_dir,
                  preexec=small_disk)
    _assert_one_clear_error(proc, "prepare", "no space left to write")
    leftovers = [p.name for p in (smoke_dir / "full").iterdir()] if (smoke_dir / "full").exists() else []
    assert leftovers == [], leftovers


def test_unknown_config_group_option(tmp_path: Path) -> None:
    proc = _stage(["pipeline.params", "model=nope", "--out", str(tmp_path / "p.yaml")], Path.cwd())
    _assert_one_clear_error(proc, "params", "nope")
    assert not (tmp_path / "p.yaml").exists()


def test_template_with_an_undefined_variable(smoke_dir: Path) -> None:
    raw = compose([*SMOKE, "prompt=plain"])
    raw["prompt"]["template"] = "{{ instruction }} {{ inptu }}"
    (smoke_dir / "typo.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _stage(["pipeline.render", "--params", "typo.yaml", "--prepared", "prepared", "--base-model", "base",
                   "--out", "rendered-typo", "--report", "typo-report.json"], smoke_dir)
    _assert_one_clear_error(proc, "render", "'inptu' is undefined")
    assert not (smoke_dir / "rendered-typo").exists()


def test_secret_looking_keys_are_redacted() -> None:
    params = {"model": {"hub_token": "hf_abc", "name": "x", "config_overrides": {"num_key_value_heads": 2}}, "tracking": {"password": "pw", "api_key": "k"},
              "data": {"columns": {"keywords": "kw"}}, "finetune": {"lora": {"target_modules": ["q_proj"]}}}
    flat = params_for_logging(params)
    assert flat["model.hub_token"] == flat["tracking.password"] == flat["tracking.api_key"] == REDACTED
    assert flat["model.name"] == "x" and flat["data.columns.keywords"] == "kw"  # "keywords" is no secret
    assert flat["model.config_overrides.num_key_value_heads"] == "2"  # nor is a "key" inside a name
    assert redact_tree(params)["tracking"] == {"password": REDACTED, "api_key": REDACTED}


def test_env_secrets_never_reach_mlflow_and_runs_are_deterministic(
        smoke_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical runs (train + evaluate) give identical weights, metrics and predictions;
    neither logs an environment secret or a secret-looking config value."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    secrets = {"HF_TOKEN": "hf_env_secret_1", "MLFLOW_TRACKING_PASSWORD": "pw_env_secret_2",
               "AWS_SECRET_ACCESS_KEY": "aws_env_secret_3"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    raw = compose(SMOKE)
    raw["model"]["config_overrides"]["hub_token"] = "cfg_secret_4"
    cfg = from_mapping(raw)
    uri = f"sqlite:///{smoke_dir / 'det.db'}"
    tracking = train.Tracking(uri, smoke_dir / "det-artifacts", smoke_dir)
    outputs, run_ids = [], []
    for i in range(2):
        out = smoke_dir / f"det{i}"
        run_ids.append(train.run(cfg, train.Paths(smoke_dir / "rendered", smoke_dir / "base", out / "model",
                                                  out / "curves", out / "ckpt"), tracking)["run_id"])
        evaluate.run(cfg, evaluate.Paths(smoke_dir / "rendered", smoke_dir / "prepared", smoke_dir / "base",
                                         out / "eval", out / "model"), tracking)
        outputs.append(out)
    a, b = (load_file(o / "model/adapter/adapter_model.safetensors") for o in outputs)
    assert all((a[k] == b[k]).all() for k in a)
    for name in ("metrics.json", "predictions.jsonl"):
        assert (outputs[0] / "eval" / name).read_text() == (outputs[1] / "eval" / name).read_text(), name
    # Byte-identical model folders (no run id or timing inside: DVC would see a new output each run),
    # and each evaluate found its own training run by that digest: the newest one.
    digest = stage_run.model_digest(outputs[0] / "model")
    assert digest == stage_run.model_digest(outputs[1] / "model") and run_ids[0] != run_ids[1]
    client = MlflowClient(uri)
    for run_id in run_ids:
        logged = client.get_run(run_id)
        assert logged.data.tags[stage_run.DIGEST_TAG] == digest and logged.info.status == "FINISHED"
        assert "eval_tuned/overall/score" in logged.data.metrics
    run = client.get_run(run_ids[0])
    logged = json.dumps([run.data.params, run.data.tags])
    logged += (outputs[0] / "model/config.yaml").read_text()
    logged += "".join(p.read_text(errors="ignore") for p in (smoke_dir / "det-artifacts").rglob("*")
                      if p.is_file() and p.suffix in (".yaml", ".json", ".md", ".jsonl"))
    for value in [*secrets.values(), "cfg_secret_4"]:
        assert value not in logged, value
    assert run.data.params["model.config_overrides.hub_token"] == REDACTED


@pytest.mark.slow
def test_four_concurrent_training_jobs_record_four_runs(smoke_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{smoke_dir / 'parallel.db'}"
    procs = [subprocess.Popen([sys.executable, "-m", *_train_args("base", f"par{i}")], cwd=smoke_dir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert all(code == 0 for code, _ in results), [err[-2000:] for code, err in results if code]
    assert not any("database is locked" in err for _, err in results)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("instruction-tuning").experiment_id])
    # Four identical jobs: four runs, each finished and tagged with its (identical) model folder's digest.
    digests = {stage_run.model_digest(smoke_dir / f"par{i}") for i in range(4)}
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags[stage_run.DIGEST_TAG] for r in runs} == digests and len(digests) == 1

"""The shipped model answers as evaluate did: evaluate, export and promote the smoke model, start
``mlflow models serve -m models:/NAME@champion --env-manager local`` on 127.0.0.1, send two chat
requests, and compare the answers with evaluate's greedy generations for the same test rows (the
same max_new_tokens)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline import evaluate, export, promote
from pipeline.core.config import PipelineConfig
from pipeline.core.files import read_jsonl
from pipeline.prompting.templates import user_message
from pipeline.tracking.runs import Tracking

from sweep_helpers import env, free_port, stop_group, wait_until_up
from test_export import make_tuned


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _evaluated(tmp: Path, cfg: PipelineConfig, data: Path, base: Path, uri: str) -> tuple[str, Path, Path]:
    """A tuned smoke model evaluated (its own MLflow run), exported; the run id, export and eval folders."""
    from mlflow.tracking import MlflowClient

    tuned = make_tuned(cfg, base, data / "rendered", tmp / "tuned")
    out = tmp / "eval"
    evaluate.run(cfg, evaluate.Paths(data / "rendered", data / "prepared", base, out, tuned),
                 Tracking(uri, tmp / "mlartifacts", tmp))
    export.run(cfg, export.Paths(data / "rendered", base, tuned, tmp / "export", tmp / "check.json"))
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    return run.info.run_id, tmp / "export", out


@pytest.mark.slow
def test_served_answers_equal_evaluates(tmp_path: Path, monkeypatch, smoke_cfg: PipelineConfig, smoke_data: Path,
                                        smoke_base: Path) -> None:
    from transformers import AutoTokenizer

    cfg = dataclasses.replace(smoke_cfg, eval=dataclasses.replace(smoke_cfg.eval, models=["base", "tuned"]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    run_id, folder, out = _evaluated(tmp_path, cfg, smoke_data, smoke_base, uri)
    promote.run(cfg, promote.Selection(run_id=run_id, export=folder), uri, tmp_path)

    # Two test rows whose rendered prompt is the chat template over their one user message (not truncated).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = {r["id"]: r for r in read_jsonl(smoke_data / "prepared" / "test.jsonl")}
    cases = []
    for row in read_jsonl(out / "predictions.jsonl"):
        messages = [{"role": "user", "content": user_message(examples[row["id"]])}]
        if tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == row["prompt"]:
            cases.append((messages, cfg.eval.max_new_tokens[examples[row["id"]]["task_type"]],
                          row["tuned_prediction"]))
    cases = sorted(cases, key=lambda c: not c[2])  # answers with text first: an empty one proves little
    assert len(cases) >= 2 and cases[1][2], cases
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{cfg.tracking.experiment}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(MLFLOW_TRACKING_URI=uri), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log, 240, "mlflow models serve", poll=1)
        for messages, budget, expected in cases[:2]:
            answer = _post(f"http://127.0.0.1:{port}/invocations", {"messages": messages, "max_tokens": budget})
            [reply] = answer if isinstance(answer, list) else answer.get("predictions", [answer])
            assert reply["choices"][0]["message"]["content"].strip() == expected, (answer, expected)
    finally:
        stop_group(proc)

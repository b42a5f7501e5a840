"""The benchmark scripts keep working: each runs in its few-second --smoke mode on the smoke model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_eval_throughput_smoke(smoke_base: Path, capsys) -> None:
    bench = load("eval_throughput")
    assert bench.main(["--smoke", "--model", str(smoke_base)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 prompts")
    counts = [int(n) for n in re.findall(r"(\d+) tokens in", out)]
    assert len(counts) == 2 and counts[0] == counts[1] > 0  # both paths generated the same tokens
    assert re.search(r"ratio \(batched / per-example tokens/s\): \d+\.\d+x", out)
    assert "identical answers: 8/8" in out


def test_prepare_render_throughput_smoke(smoke_base: Path, capsys) -> None:
    bench = load("prepare_render_throughput")
    assert bench.main(["--smoke", "--base-model", str(smoke_base)]) == 0
    out = capsys.readouterr().out
    assert "examples: 1000" in out
    assert "prepare + render, near-dup off:" in out and "prepare + render, near-dup on:" in out
    assert "pieces.PieceEncoder" in out and "the tokenizer's own call" in out
    assert re.search(r"render's parts, redone in one process: tokenizer load \(fresh process\) [\d.]+s; .*tokenization [\d.]+s", out)


def test_train_throughput_smoke_in_micro_batches(smoke_base: Path, tmp_path: Path, capsys) -> None:
    """--micro-batches 2: our packed case accumulates two half-size packed rows per optimizer step.
    --profile: one more step, profiled, its operator table written where asked."""
    bench = load("train_throughput")
    assert bench.main(["--smoke", "--model", str(smoke_base), "--cases", "ours_packed", "--micro-batches", "2",
                       "--profile", str(tmp_path / "profiles")]) == 0
    out = capsys.readouterr().out
    assert "(ours: in 2 micro-batches)" in out
    tok_s = re.search(r"^lora ours_packed +round 1: loss-bearing +([\d.]+) tok/s", out, flags=re.M)
    assert tok_s and float(tok_s.group(1)) > 0
    table = (tmp_path / "profiles" / "lora_ours_packed.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table and "Optimizer.step" in table  # a whole optimizer step


def test_train_throughput_smoke(smoke_base: Path, capsys) -> None:
    pytest.importorskip("trl", reason="TRL is the `bench` extra")
    bench = load("train_throughput")
    assert bench.main(["--smoke", "--model", str(smoke_base)]) == 0
    out = capsys.readouterr().out
    cases = dict(re.findall(r"^lora (\w+) +round 1: loss-bearing +([\d.]+) tok/s", out, flags=re.M))
    assert set(cases) == {"ours_default", "ours_dynamic", "ours_length_grouped", "ours_packed", "trl_default",
                          "trl_packed", "naive_hf"}
    # What a user gets (trainer.batching=auto): packed rows, the probe having found packing exact.
    assert re.search(r"^lora ours_default .*\[packed \d+-token rows, \d+ per step, ~\d+ MB activations each, checkpointing o(n|ff)\]",
                     out, flags=re.M)
    assert all(float(v) > 0 for v in cases.values())
    waste = dict(re.findall(r"^lora (\w+) .* waste +([\d.]+)%", out, flags=re.M))
    assert float(waste["ours_packed"]) < 2.0
    assert re.search(r"ratio ours_packed / trl_packed \(loss-bearing tok/s\): \d+\.\d+x", out)
    assert re.search(r"fp32 matmul peak \d+\.\d GFLOP/s", out)


def test_packed_attention_smoke(tmp_path: Path, capsys) -> None:
    bench = load("packed_attention")
    assert bench.main(["--smoke", "--rendered", str(tmp_path)]) == 0  # no rendered rows: random lengths
    out = capsys.readouterr().out
    assert out.startswith("3 documents, lengths ")
    timed = dict(re.findall(r"^  (.+?) +([\d.]+) ms per forward\+backward", out, flags=re.M))
    assert set(timed) == {"packed_sdpa (ours)", "per-document, repeated kv heads", "one call, documents padded",
                          "one call, block mask"}
    assert all(float(ms) > 0 for ms in timed.values())


def test_repro_overhead_smoke(capsys) -> None:
    bench = load("repro_overhead")
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"python -m pipeline\.train --help: \d+\.\d+ s", out)
    assert "heavy modules imported by --help: none" in out

"""Fine-tuning against prompting on the smoke model: base zero-shot, base k-shot and tuned, on the same
test rows with the same metric code; the k-shot prompts hold exactly k exemplars from train."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import evaluate
from pipeline.core.files import read_json, read_jsonl
from pipeline.prompting.shots import ShotPool

ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def data(smoke_data: Path) -> Path:
    return smoke_data


def test_kshot_prompts_hold_exactly_k_exemplars_from_train_never_from_test(data: Path, smoke_cfg) -> None:
    k = smoke_cfg.prompt.eval_k_shot
    assert k >= 1
    train = read_jsonl(data / "prepared" / "train.jsonl")
    test = read_jsonl(data / "prepared" / "test.jsonl")
    kshot = read_jsonl(data / "rendered" / "test_kshot.jsonl")
    zero = read_jsonl(data / "rendered" / "test.jsonl")
    assert [r["id"] for r in kshot] == [r["id"] for r in zero] == [e["id"] for e in test]
    test_outputs = {e["output"] for e in test}
    pool = ShotPool(train)
    for row, example, plain in zip(kshot, test, zero):
        assert row["prompt"].count(ASSISTANT) == k + 1, row["id"]  # k answered exemplars, then the question
        assert plain["prompt"].count(ASSISTANT) == 1
        assert row["completion"] == plain["completion"]  # the same scored answer
        shown = [turn.split("<|im_end|>")[0] for turn in row["prompt"].split(ASSISTANT)[1:-1]]
        drawn = pool.draw(example, k, smoke_cfg.prompt.shot_seed)
        assert shown == [e["output"] for e in drawn]
        assert {e["id"] for e in drawn} <= {e["id"] for e in train}
        assert not set(shown) & test_outputs - {e["output"] for e in drawn}, "no test answer is shown"
    # The training template (what the guard checks) is untouched; the k-shot one is recorded beside it.
    assert read_json(data / "rendered" / "template_kshot.json")["k_shot"] == k
    assert read_json(data / "rendered" / "template.json")["k_shot"] == smoke_cfg.prompt.k_shot
    assert read_json(data / "render.json")["kshot_arm"]["rows"] == len(test)


def test_three_arms_scored_side_by_side_with_paired_deltas(tmp_path: Path, data: Path, smoke_base: Path,
                                                           smoke_cfg) -> None:
    from pipeline.core.models import load_causal_lm

    tuned = tmp_path / "tuned"
    load_causal_lm(smoke_base).save_pretrained(tuned / "model")  # full weights, equal to the base
    shutil.copy(data / "rendered" / "template.json", tuned / "template.json")
    out = tmp_path / "eval"
    metrics = evaluate.run(smoke_cfg, evaluate.Paths(data / "rendered", data / "prepared", smoke_base, out, tuned), None)
    arms = ("base", "base_kshot", "tuned")
    # No --encoder or --aligned folder here: those two arms are skipped.
    assert set(smoke_cfg.eval.models) == {*arms, "encoder", "aligned"}
    for arm in arms:
        assert set(metrics[arm]) == {"topic", "qa", "past_tense", "summary", "overall"}
    assert metrics["tuned"] == metrics["base"]  # identical weights and prompts: the same code, the same numbers
    intervals = read_json(out / "intervals.json")
    for key, (a, b) in {"delta": ("tuned", "base"), "delta_tuned_vs_base_kshot": ("tuned", "base_kshot"),
                        "delta_base_kshot_vs_base": ("base_kshot", "base")}.items():
        d = intervals["intervals"][key]["overall"]["score"]
        assert d["delta"] == pytest.approx(metrics[a]["overall"]["score"] - metrics[b]["overall"]["score"])
        assert d["low"] <= d["delta"] <= d["high"] and 0 < d["p_value"] <= 1
    rows = read_jsonl(out / "predictions.jsonl")
    assert all(r["base_kshot_prompt"].count(ASSISTANT) == smoke_cfg.prompt.eval_k_shot + 1 for r in rows)
    assert {"base_flags", "base_kshot_flags", "tuned_flags"} <= set(rows[0])
    assert set(intervals["safety"]) == set(arms)
    report = (out / "report.md").read_text()
    assert "| tuned − base (95% CI, p) | tuned − base_kshot (95% CI, p) | base_kshot − base (95% CI, p) |" in report
    assert ("Largest gap between slices" in report or "No gap between slices to compare" in report)
    assert "## Safety review of outputs" in report
    assert "Encoder arm: skipped (no --encoder folder given)." in report and "encoder" not in metrics
    bars = read_json(out / "per_task.json")
    assert {b["model"] for b in bars} == set(arms)
    slice_rows = read_json(out / "slices.json")
    assert {r["slice"] for r in slice_rows} == set(smoke_cfg.eval.slices)
    assert (out / "plots" / "slices.png").is_file()
    # compare --arms reads this real output: each arm's overall score and every paired difference, side by side
    from pipeline import compare

    table = compare.arms_table(compare.load_evaluation(str(out), tmp_path, ""))
    assert table["arms"] == list(arms)
    overall = table["rows"][-1]
    assert {a: c["value"] for a, c in overall["arms"].items()} == {a: metrics[a]["overall"]["score"] for a in arms}
    assert overall["differences"]["tuned − base_kshot"]["delta"] == pytest.approx(
        metrics["delta_tuned_vs_base_kshot"]["overall"]["score"])
    assert [(r["task"], r["metric"]) for r in table["rows"]] == [
        ("past_tense", "rougeL"), ("qa", "exact_match"), ("summary", "rougeL"), ("topic", "accuracy"),
        ("topic", "macro_f1"), ("overall", "score")]

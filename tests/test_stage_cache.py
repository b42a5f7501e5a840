"""The shared-stage cache keys follow dvc.yaml: a stage's key moves with its own params, code and
inputs, and with nothing else; a key is built once even when two processes ask at the same time."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
from sweep_helpers import REPO

from pipeline.tracking import stage_cache
from pipeline.params import compose

SHARED = ("base_model", "prepare", "render")


def keys(overrides: list[str], root: Path = REPO) -> dict[str, str]:
    recipes = stage_cache.stage_keys(stage_cache.read_specs(root / "dvc.yaml"), compose(overrides), root, SHARED)
    return {stage: r["key"] for stage, r in recipes.items()}


def test_specs_come_from_dvc_yaml() -> None:
    specs = stage_cache.read_specs(REPO / "dvc.yaml")
    assert specs["render"].params == ("prompt",)
    assert dict(specs["render"].inputs) == {"data/prepared": "prepare", "models/base": "base_model"}
    assert "pipeline/prompting/templates.py" in specs["render"].code


@pytest.mark.parametrize("override, changed", [
    ("trainer.lr=3e-4", set()),
    ("finetune.lora.r=4", set()),
    ("eval.batch_size=4", set()),
    ("prompt=alpaca", {"render"}),
    ("data.n_per_task=7", {"prepare", "render"}),
    ("seed=7", {"base_model", "prepare", "render"}),
    ("model.init=random", {"base_model", "render"}),
])
def test_a_key_moves_with_its_stage_inputs_only(override: str, changed: set[str]) -> None:
    base, new = keys([]), keys([override])
    assert {s for s in SHARED if base[s] != new[s]} == changed


def test_code_change_moves_the_key(tmp_path: Path) -> None:
    for name in ("dvc.yaml", "pipeline", "conf"):  # every dependency dvc.yaml names
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, tmp_path / name)
    before = keys([], tmp_path)
    with open(tmp_path / "pipeline/prompting/templates.py", "a") as fh:
        fh.write("\n# a change\n")
    after = keys([], tmp_path)
    assert before["render"] != after["render"]
    assert before["prepare"] == after["prepare"] and before["base_model"] == after["base_model"]


def _build(cache: str, barrier: object) -> None:
    import time

    barrier.wait()  # type: ignore[attr-defined]

    def slow(d: Path) -> None:
        time.sleep(0.5)
        (d / "out.txt").write_text("built")

    stage_cache.build_once(Path(cache), "render", {"key": "k1"}, slow)


def test_concurrent_requests_build_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_build, args=(str(tmp_path), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert [b["key"] for b in stage_cache.builds(tmp_path)] == ["k1"]
    assert (tmp_path / "render/k1/out.txt").read_text() == "built"
    assert stage_cache.recipe_of(tmp_path / "render/k1") == {"key": "k1"}


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    def boom(d: Path) -> None:
        (d / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        stage_cache.build_once(tmp_path, "prepare", {"key": "k2"}, boom)
    assert not stage_cache.entry(tmp_path, "prepare", "k2").exists()
    path, built = stage_cache.build_once(tmp_path, "prepare", {"key": "k2"}, lambda d: (d / "ok").write_text("1"))
    assert built and (path / "ok").exists()

"""The render cache is DVC's: a real `dvc repro render` in a temporary git repo does not tokenize
again when template, data and tokenizer are unchanged, and re-renders when any of them changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.files import read_jsonl
from pipeline.params import compose
from sweep_helpers import copy_checkout
from test_pipeline_dvc import _sh


def repro(repo: Path) -> str:
    return _sh([sys.executable, "-m", "dvc", "repro", "render"], repo)


def set_params(repo: Path, *overrides: str) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(compose(["+experiment=smoke", *overrides]), sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cache")
    copy_checkout(repo)
    set_params(repo)
    _sh(["git", "init", "-q"], repo)
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "init"], repo)
    out = repro(repo)
    assert "Running stage 'render'" in out
    return repo


def test_unchanged_inputs_do_not_render_again(repo: Path) -> None:
    before = (repo / "data/rendered/train.jsonl").stat().st_mtime_ns
    out = repro(repo)
    assert "Running stage" not in out
    assert (repo / "data/rendered/train.jsonl").stat().st_mtime_ns == before
    for name in ("reports/render/lengths.png", "reports/prepare/lengths.png", "data/prepared/quarantine.jsonl"):
        assert (repo / name).is_file(), name


def test_a_template_change_re_renders_without_re_preparing(repo: Path) -> None:
    set_params(repo, "prompt.system=Answer briefly.")
    out = repro(repo)
    assert "Running stage 'render'" in out and "Running stage 'prepare'" not in out
    assert "Answer briefly." in (repo / "data/rendered/train.jsonl").read_text()


def test_a_template_file_edit_re_renders(repo: Path) -> None:
    mine = repo / "conf/prompt/mine.jinja"
    mine.write_text("{{ instruction }}\n{{ input }}\nAnswer:", encoding="utf-8")
    set_params(repo, "prompt=plain", "prompt.template_file=conf/prompt/mine.jinja")
    assert "Running stage 'render'" in repro(repo)
    mine.write_text("Task: {{ instruction }}\n{{ input }}\nAnswer:", encoding="utf-8")  # same params, new text
    assert "Running stage 'render'" in repro(repo)
    assert all(r["prompt"].startswith("Task: ") for r in read_jsonl(repo / "data/rendered/train.jsonl"))


def test_a_data_change_re_prepares_and_re_renders(repo: Path) -> None:
    set_params(repo, "prompt=plain", "prompt.template_file=conf/prompt/mine.jinja", "data.n_per_task=10")
    out = repro(repo)
    assert "Running stage 'prepare'" in out and "Running stage 'render'" in out


def test_a_tokenizer_change_invalidates_render(repo: Path) -> None:
    # Editing the tokenizer is a change to render's models/base dependency; `dvc status`
    # shows it without paying for a rebuild of the base model.
    config = repo / "models/base/tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "comment": "edited"}', 1))
    status = _sh([sys.executable, "-m", "dvc", "status", "render"], repo)
    assert "render:" in status and "models/base" in status

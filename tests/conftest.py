"""Shared fixtures: the smoke config, composed from conf/, the smoke base model built from it, and its
prepared and rendered data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import base_model, prepare, render
from pipeline.core.config import PipelineConfig, from_mapping
from pipeline.params import compose

# Real data shared between checkouts (e.g. self-instruct); tests that read it skip when it is absent.
SHARED = Path(__file__).resolve().parents[2] / "shared"


def config_with(**sections: Any) -> PipelineConfig:
    """The default composed config with some sections (``data=...``, ``prompt=...``, ``seed=...``) replaced:
    what a stage's ``run`` takes when a test builds one section by hand."""
    import dataclasses

    return dataclasses.replace(from_mapping(compose([])), **sections)


@pytest.fixture(scope="session")
def smoke_cfg() -> PipelineConfig:
    """The typed, validated ``+experiment=smoke`` configuration."""
    return from_mapping(compose(["+experiment=smoke"]), source="+experiment=smoke")


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory: pytest.TempPathFactory, smoke_cfg: PipelineConfig) -> Path:
    """A 2-layer random-init SmolLM2 checkpoint with the real tokenizer (about 13 s, built once)."""
    out = tmp_path_factory.mktemp("smoke") / "base"
    base_model.run(smoke_cfg, base_model.Paths(out))
    return out


def prepared_workdir(root: Path, raw: dict[str, Any], base: Path) -> Path:
    """``root`` with ``params.yaml`` (``raw``), its prepared and rendered data (plus ``stats.json`` and
    ``render.json``) and a link ``base`` to the model: what the later stages read."""
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = from_mapping(raw)
    prepare.run(cfg, prepare.Paths(root / "prepared", root / "stats.json"))
    render.run(cfg, render.Paths(root / "prepared", base, root / "rendered", root / "render.json"))
    (root / "base").symlink_to(base)
    return root


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory, smoke_base: Path) -> Path:
    """The smoke config's prepared and rendered data, built once; tests only read it."""
    return prepared_workdir(tmp_path_factory.mktemp("smoke_data"), compose(["+experiment=smoke"]), smoke_base)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI (``CI=true``) a slow test that skips, for a tool it needs that is missing, fails instead:
    otherwise CI goes green without running it. ``.ci/run`` installs what they need."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("slow")
            and os.environ.get("CI", "").lower() in ("1", "true", "yes")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true and a slow test skipped (install what it needs in .ci/run): {reason}"


@pytest.fixture(scope="session")
def tokenizer(smoke_base: Path):
    """The smoke model's tokenizer (SmolLM2's real one), as transformers loads it."""
    from pipeline.core.models import load_tokenizer

    return load_tokenizer(smoke_base)


@pytest.fixture(scope="session")
def chat(tokenizer, smoke_cfg: PipelineConfig):
    """The smoke config's chat template over that tokenizer."""
    from pipeline.prompting.templates import make_template

    return make_template(smoke_cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)

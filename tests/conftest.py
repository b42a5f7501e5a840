"""Shared fixtures: the smoke config, composed from conf/, and the smoke base model built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import base_model
from pipeline.config import PipelineConfig, from_mapping
from pipeline.params import compose

# Real data shared between checkouts (e.g. self-instruct); tests that read it skip when it is absent.
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def smoke_cfg() -> PipelineConfig:
    """The typed, validated ``+experiment=smoke`` configuration."""
    return from_mapping(compose(["+experiment=smoke"]), source="+experiment=smoke")


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory: pytest.TempPathFactory, smoke_cfg: PipelineConfig) -> Path:
    """A 2-layer random-init SmolLM2 checkpoint with the real tokenizer (about 13 s, built once)."""
    out = tmp_path_factory.mktemp("smoke") / "base"
    base_model.run(smoke_cfg.model, smoke_cfg.seed, out)
    return out

"""Where relative paths in config are looked up: the working directory, then this checkout."""

from __future__ import annotations

from pathlib import Path

# The checkout this package belongs to: it ships the default safety lists and templates.
PROJECT = Path(__file__).resolve().parents[2]


def search_roots() -> list[Path]:
    """The folders a relative config path is looked up in, in order: the working directory
    (a DVC repo root, or where the Hydra app was launched), then the project checkout."""
    return [Path.cwd(), PROJECT]

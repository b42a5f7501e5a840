"""Mixing several sources: each source's share (weight) and cap, sampled deterministically.

Weights are shares of the mixture, not repetition counts: the mixture is the largest one
in which every source has its share without repeating a row (a repeated row would be a
duplicate, and could land in train and test at once). Caps then bound each source.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pipeline.data.schema import Example


@dataclass(frozen=True)
class Part:
    """One loaded source of a mixture."""

    name: str
    examples: list[Example]
    weight: float | None = None
    cap: int | None = None


def sizes(parts: list[Part]) -> list[int]:
    """How many examples each part contributes: shares by weight (if given), then caps."""
    counts = [len(p.examples) for p in parts]
    if parts and all(p.weight is not None for p in parts):
        total_weight = sum(p.weight for p in parts)  # type: ignore[misc]
        shares = [p.weight / total_weight for p in parts]  # type: ignore[operator]
        # The largest total for which no source needs more rows than it has.
        total = min(n / s for n, s in zip(counts, shares))
        counts = [min(n, math.floor(s * total + 1e-9)) for n, s in zip(counts, shares)]
    return [min(n, p.cap) if p.cap is not None else n for n, p in zip(counts, parts)]


def mix(parts: list[Part], seed: int) -> tuple[list[Example], dict[str, dict[str, int]]]:
    """Sample each part to its size and concatenate; return the rows and per-source counts.

    Each source draws from its own generator seeded by ``(seed, name)``, so changing one
    source's weight or cap never changes which rows another source contributes, and rows
    keep their order within their source.
    """
    rows: list[Example] = []
    report: dict[str, dict[str, int]] = {}
    for part, n in zip(parts, sizes(parts)):
        chosen = sorted(random.Random(f"{seed}:{part.name}").sample(range(len(part.examples)), n))
        rows += [part.examples[i] for i in chosen]
        report[part.name] = {"loaded": len(part.examples), "used": n}
    return rows, report

"""k-shot exemplars: drawn from the train split only, per example, reproducibly from a seed.

Exemplars come from the same task as the example when it has enough train rows (a
sentiment example is shown sentiment answers), never include the example itself, and
never come from val/test: an evaluated answer shown as an exemplar would be a leak.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Mapping, Sequence

Row = Mapping[str, Any]


class ShotPool:
    """The train rows exemplars are drawn from, indexed by task."""

    def __init__(self, train: Sequence[Row]):
        self.rows = list(train)
        self.by_task: dict[str, list[Row]] = defaultdict(list)
        for row in self.rows:
            self.by_task[row["task"]].append(row)

    def draw(self, example: Row, k: int, seed: int) -> list[Row]:
        """``k`` exemplars for ``example`` (fewer if train has fewer); depends only on (pool, id, k, seed)."""
        if k <= 0:
            return []
        same = [r for r in self.by_task.get(example["task"], []) if r["id"] != example["id"]]
        pool = same if len(same) >= k else [r for r in self.rows if r["id"] != example["id"]]
        return random.Random(f"{seed}:{example['id']}").sample(pool, min(k, len(pool)))

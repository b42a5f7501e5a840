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
        self.ids: dict[str, set[str]] = defaultdict(set)  # per task: whether a row must be left out
        for row in self.rows:
            self.by_task[row["task"]].append(row)
            self.ids[row["task"]].add(row["id"])

    def draw(self, example: Row, k: int, seed: int) -> list[Row]:
        """``k`` exemplars for ``example`` (fewer if train has fewer); depends only on (pool, id, k, seed)."""
        if k <= 0:
            return []
        # Filtering is O(train) per example; skip it when the example is not in its task's
        # rows (every val/test example): the pool, hence the draw, is the same list.
        task, own = example["task"], example["id"]
        same = self.by_task.get(task, [])
        if own in self.ids.get(task, ()):
            same = [r for r in same if r["id"] != own]
        pool = same if len(same) >= k else [r for r in self.rows if r["id"] != own]
        return random.Random(f"{seed}:{example['id']}").sample(pool, min(k, len(pool)))

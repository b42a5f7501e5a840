"""Train/val/test splits that cannot leak a shared context: rows are split in groups.

Several rows often share their context: questions about one passage, reviews quoted under
several prompts, an article summarized twice. Were such rows split one by one, the passage
would sit on both sides and evaluation would score recall, not reading. So rows are first
grouped (``data.group_by``), and each group goes to one split, whole:

- ``auto``: a row's context is its longest input line (prompt line, when the row has no
  input) that is not the task's template (see :func:`pipeline.data.dedup.frequent`); rows
  whose context is the same text, in any task, form one group;
- a field name (``input``, ``instruction``, ``output`` or ``meta.<column>``): rows with the
  same non-empty value form one group;
- ``re:<pattern>``: the pattern searched in the prompt; group 1 (or the whole match when the
  pattern has no group) is the key;
- ``none``: every row is its own group.

Groups are split per task (stratified: every task is in every split), in an order shuffled
by a generator seeded with ``(seed, task)``, so the split depends only on (rows, fractions,
seed, group_by), and one task's split does not depend on another's. A task with fewer than
three groups, or whose groups cannot give it a test set, is pooled with the other such tasks
and the pool is split as one task. With every group a single row this is exactly the
per-row split the pipeline has always made.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.core.errors import DataError
from pipeline.data import dedup
from pipeline.data.schema import Example

SPLITS = ("train", "val", "test")
FIELDS = ("instruction", "input", "output")  # the Example fields data.group_by may name (or meta.<column>)
MIN_GROUPS = 3  # one group each for test, val and train
POOL = "(pooled)"  # the name the pool of small tasks is shuffled under


@dataclass
class Split:
    """The rows of each split, and what the grouping did (for the stats report)."""

    splits: dict[str, list[Example]]
    stats: dict[str, Any] = field(default_factory=dict)


def split(examples: list[Example], val_fraction: float, test_fraction: float, seed: int,
          group_by: str = "none", template_df: float = 1.0) -> dict[str, list[Example]]:
    """The rows of each split (:func:`plan`'s ``splits``)."""
    return plan(examples, val_fraction, test_fraction, seed, group_by, template_df).splits


def plan(examples: list[Example], val_fraction: float, test_fraction: float, seed: int,
         group_by: str = "none", template_df: float = 1.0) -> Split:
    """Group the rows by ``group_by`` and split the groups per task; see the module docstring.

    ``template_df`` is ``data.dedup.template_df``: ``auto`` never groups by a line that more
    than this share of a task's rows hold (its template).
    """
    groups = _groups(examples, group_keys(examples, group_by, template_df))
    by_task: dict[str, list[list[Example]]] = defaultdict(list)
    for rows in groups:
        by_task[_home(rows)].append(rows)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    pool: list[list[Example]] = []
    pooled = []
    for task in sorted(by_task):
        placed = _place(by_task[task], task, val_fraction, test_fraction, seed)
        if placed is None:  # too small for a split of its own
            pool += by_task[task]
            pooled.append(task)
            continue
        for s in SPLITS:
            out[s] += placed[s]
    if pool:
        placed = _place(pool, POOL, val_fraction, test_fraction, seed) or {"train": [e for g in pool for e in g]}
        for s in SPLITS:
            out[s] += placed.get(s, [])
    sizes = [len(g) for g in groups]
    return Split(out, {"group_by": group_by, "groups": len(groups), "grouped_rows": sum(n for n in sizes if n > 1),
                       "largest_group": max(sizes, default=0), "pooled_tasks": pooled,
                       "pooled_rows": sum(len(g) for g in pool)})


def group_keys(examples: list[Example], group_by: str, template_df: float = 1.0) -> list[str | None]:
    """Each row's group key (``None``: a group of its own). Raises :class:`DataError` when a
    field or pattern groups nothing because no row has it (a misspelt ``data.group_by``)."""
    if group_by == "none":
        return [None] * len(examples)
    if group_by == "auto":
        return _contexts(examples, template_df)
    keys = [_key(value) for value in map(_reader(group_by), examples)]
    if examples and all(k is None for k in keys):
        raise DataError([f"data.group_by: {group_by!r} finds nothing in any of the {len(examples)} rows"])
    return keys


def _reader(group_by: str) -> Callable[[Example], str | None]:
    if group_by.startswith("re:"):
        pattern = re.compile(group_by[3:])

        def matched(ex: Example) -> str | None:
            found = pattern.search(dedup.prompt_text(ex))
            return None if found is None else found.group(1 if pattern.groups else 0)
        return matched
    if group_by.startswith("meta."):
        return lambda ex: ex.meta.get(group_by[5:])
    return lambda ex: getattr(ex, group_by)


def _key(value: Any) -> str | None:
    text = dedup.normalize(value if isinstance(value, str) else "" if value is None else str(value))
    return text or None


def _contexts(examples: list[Example], template_df: float) -> list[str | None]:
    """Each row's longest non-template line of its input (of its prompt, when it has no input), when
    another row has the same one."""
    lines = [{dedup.normalize(line) for line in _context_text(ex).split("\n")} - {""} for ex in examples]
    template = dedup.frequent(lines, [ex.task for ex in examples], template_df)
    own = [max(sorted(ls - template[ex.task]), key=len, default=None) for ex, ls in zip(examples, lines)]
    shared = Counter(own)
    return [key if key is not None and shared[key] > 1 else None for key in own]


def _context_text(ex: Example) -> str:
    # The input is what a row is about; the instruction is the task's question (its paraphrases
    # recur across rows by design). Without an input, the prompt holds both.
    return ex.input if ex.messages is None and ex.input.strip() else dedup.prompt_text(ex)


def _groups(examples: list[Example], keys: list[str | None]) -> list[list[Example]]:
    """Rows with one key together; each keyless row alone; rows sorted by id within a group."""
    by_key: dict[str, list[Example]] = defaultdict(list)
    alone = []
    for ex, key in zip(examples, keys):
        if key is None:
            alone.append([ex])
        else:
            by_key[key].append(ex)
    return [sorted(rows, key=lambda e: e.id) for rows in by_key.values()] + alone


def _home(rows: list[Example]) -> str:
    """The task a group is split with: most of its rows' task (the first name on a tie)."""
    counts = Counter(e.task for e in rows)
    return min(counts, key=lambda t: (-counts[t], t))


def _place(groups: list[list[Example]], task: str, val_fraction: float, test_fraction: float,
           seed: int) -> dict[str, list[Example]] | None:
    """Fill test, then val, to their share of the rows, group by group in a seeded order; the
    rest is train. ``None`` when there are too few groups or none fits the test share."""
    if len(groups) < MIN_GROUPS:
        return None
    order = sorted(groups, key=lambda g: g[0].id)
    random.Random(f"{seed}:{task}").shuffle(order)
    n = sum(len(g) for g in groups)
    targets = {"test": max(1, round(n * test_fraction)),
               "val": max(1, round(n * val_fraction)) if val_fraction > 0 else 0}
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for rows in order:
        # A group joins a split that still needs rows when that leaves the split no farther from
        # its share than before: single rows always fit, a group twice the share never does.
        into = next((s for s, want in targets.items()
                     if len(out[s]) < want and len(out[s]) + len(rows) - want <= want - len(out[s])), "train")
        out[into] += rows
    return out if out["test"] else None

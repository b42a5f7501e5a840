"""Rows of token ids with exact label masks, rendered in chunks by forked workers.

:func:`tokenize_split` is one split, in one process: each piece of a rendered example
(:func:`pipeline.prompting.templates.segments`) is tokenized on its own and the pieces
concatenated, so the label mask is exact. :func:`render_jobs` writes many splits, cut into
chunks that forked workers render to part files, appended in order: the same bytes as one
process writes (``tests/test_render_pieces.py`` checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from pipeline.core import parallel
from pipeline.core.files import jsonl_bytes
from pipeline.core.models import IGNORE_INDEX
from pipeline.prompting.pieces import PieceEncoder
from pipeline.prompting.shots import ShotPool
from pipeline.prompting.templates import Template, segments


def tokenize_split(examples: list[dict[str, Any]], template: Template, tokenizer: Any, max_length: int,
                   overflow: str, last_only: bool = False,
                   pool: ShotPool | None = None,
                   encoder: Callable[[list[str], bool], list[list[int]]] | None = None,
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render, tokenize (batched, fast tokenizer) and mask one split.

    Each read and learnt piece of the text (see :func:`pipeline.prompting.templates.segments`) is
    tokenized on its own and the pieces concatenated, so the label mask is exact and
    generation at evaluation time starts from exactly the ids before the last answer.
    Labels cover every assistant turn (``train_on: all_assistant``) or only the last
    (``last_assistant``, or ``last_only``). Over-long rows keep the last answer whole
    and lose tokens from the start (``truncate``) or are removed (``drop``); both are counted.
    ``encoder`` (a :class:`PieceEncoder`, shared across splits) gives the ids; by default a new one.
    """
    rows, truncated, dropped = _rows(examples, template, tokenizer, max_length, overflow, last_only, pool, encoder)
    return rows, Tally.of(rows, truncated, dropped).report()


def _rows(examples: list[dict[str, Any]], template: Template, tokenizer: Any, max_length: int, overflow: str,
          last_only: bool, pool: ShotPool | None, encoder: Callable[[list[str], bool], list[list[int]]] | None,
          ) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """:func:`tokenize_split`'s rows, and the ids it truncated and the rows it dropped (with reasons)."""
    pieces = [segments(ex, template, pool.draw(ex, template.k_shot, template.shot_seed) if pool else ())
              for ex in examples]
    last_only = last_only or template.train_on == "last_assistant"
    # Two batched calls for the whole split: first pieces get the tokenizer's special tokens (BOS).
    encoder = encoder or PieceEncoder(tokenizer)
    first_ids = encoder([p[0][0] for p in pieces], True)
    rest_ids = iter(encoder([t for p in pieces for t, _ in p[1:]], False))
    rows, truncated, dropped = [], [], []
    for ex, parts, head in zip(examples, pieces, first_ids):
        ids, labels = list(head), [IGNORE_INDEX] * len(head)
        for k, (_, learnt) in enumerate(parts[1:], start=1):
            piece = next(rest_ids)
            ids += piece
            labels += piece if learnt and (k == len(parts) - 1 or not last_only) else [IGNORE_INDEX] * len(piece)
        n_answer = len(piece) if len(parts) > 1 else 0
        if not n_answer:
            raise ValueError(f"render: example {ex['id']!r} has no completion tokens (empty output?)")
        overflow_by = len(ids) - max_length
        if overflow_by > 0:
            if overflow == "drop" or n_answer >= max_length:
                dropped.append({"id": ex["id"], "reason": f"longer than max_length={max_length}"})
                continue
            ids, labels = ids[overflow_by:], labels[overflow_by:]
            truncated.append(ex["id"])
        rows.append({
            "id": ex["id"], "task": ex["task"], "task_type": ex["task_type"],
            "prompt": "".join([t for t, _ in parts[:-1]]), "completion": parts[-1][0],
            "input_ids": ids, "labels": labels,
        })
    return rows, truncated, dropped


@dataclasses.dataclass(frozen=True)
class Tally:
    """What a split's report is made of, from some of its rows: chunks' tallies add up."""

    lengths: list[int]  # tokens per row
    loss_tokens: int
    truncated: list[str]  # ids
    dropped: list[dict[str, Any]]  # {id, reason}

    @classmethod
    def of(cls, rows: list[dict[str, Any]], truncated: list[str], dropped: list[dict[str, Any]]) -> "Tally":
        return cls([len(r["input_ids"]) for r in rows],
                   sum(len(r["labels"]) - r["labels"].count(IGNORE_INDEX) for r in rows), truncated, dropped)

    @classmethod
    def merged(cls, parts: Sequence["Tally"]) -> "Tally":
        """One tally of a split from its chunks' tallies, in order."""
        return cls([n for t in parts for n in t.lengths], sum(t.loss_tokens for t in parts),
                   [i for t in parts for i in t.truncated], [d for t in parts for d in t.dropped])

    def report(self) -> dict[str, Any]:
        """Rows, tokens, the loss-bearing share, lengths, and what was truncated or dropped."""
        total, lengths = sum(self.lengths), sorted(self.lengths)
        return {
            "rows": len(lengths),
            "tokens": total,
            "loss_token_fraction": self.loss_tokens / total if total else 0.0,
            "max_length_seen": lengths[-1] if lengths else 0,
            "median_length": lengths[len(lengths) // 2] if lengths else 0,
            "truncated": len(self.truncated),
            "dropped": len(self.dropped),
            "dropped_rows": self.dropped,
        }


@dataclasses.dataclass(frozen=True)
class Job:
    """One output file of render: a split (or the k-shot arm) and how to render it."""

    name: str  # the file is <name>.jsonl
    examples: list[dict[str, Any]]
    template: Template
    max_length: int
    last_only: bool


@dataclasses.dataclass(frozen=True)
class _Work:
    """What every chunk of :func:`render_jobs` needs; forked workers inherit it (and each its own piece cache)."""

    jobs: list[Job]
    tokenizer: Any
    overflow: str
    pool: ShotPool | None
    encoder: PieceEncoder
    out: Path  # where each chunk's part file is written


def _render_chunk(work: _Work, task: tuple[int, int, int]) -> tuple[Path, Tally]:
    """Rows ``start:stop`` of job ``j`` written as JSONL to a part file in ``work.out``; its path
    and the rows' :class:`Tally`. Rows stay out of the pipe to the parent: it only appends files."""
    j, start, stop = task
    job = work.jobs[j]
    rows, truncated, dropped = _rows(job.examples[start:stop], job.template, work.tokenizer, job.max_length,
                                     work.overflow, job.last_only, work.pool if job.template.k_shot else None,
                                     work.encoder)
    part = work.out / f".{job.name}.{start:012d}.part"
    part.write_bytes(jsonl_bytes(rows))
    return part, Tally.of(rows, truncated, dropped)


def _append(dst: Any, part: Path) -> None:
    """Append the file ``part`` to the open file ``dst`` and remove it."""
    with open(part, "rb") as src:
        shutil.copyfileobj(src, dst, 1 << 22)
    part.unlink()


def render_jobs(jobs: list[Job], tokenizer: Any, overflow: str, pool: ShotPool | None, out: Path,
                n_workers: int | None = None) -> dict[str, tuple[dict[str, Any], list[int]]]:
    """Write each job's ``<name>.jsonl`` into ``out`` (a directory being built, see
    :func:`~pipeline.core.files.atomic_dir`); return its report and row lengths by name.

    Rows are rendered in chunks by ``n_workers`` forked processes (default
    :func:`pipeline.core.parallel.workers`) when there are enough of them and the platform
    forks (:func:`pipeline.core.parallel.fork_map`). Each chunk is written to a part file by the
    process that rendered it and appended in order, so the files are the same bytes whatever
    the number of workers. Each process keeps its own piece cache (:class:`PieceEncoder`).
    """
    tasks = [(j, start, stop) for j, job in enumerate(jobs)
             for start, stop in parallel.chunks(len(job.examples))]
    total = sum(len(job.examples) for job in jobs)
    work = _Work(jobs, tokenizer, overflow, pool, PieceEncoder(tokenizer), out)
    results = parallel.fork_map(_render_chunk, work, tasks, parallel=total >= parallel.MIN_ROWS, n_workers=n_workers)
    tallies: list[list[Tally]] = [[] for _ in jobs]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(out / f"{job.name}.jsonl", "wb")) for job in jobs]
        bar = stack.enter_context(tqdm(total=total, desc="render", unit="row", disable=None))
        for (part, tally), (j, start, stop) in zip(results, tasks):  # in order, appended as they come
            _append(files[j], part)
            tallies[j].append(tally)
            bar.update(stop - start)
    merged = [Tally.merged(parts) for parts in tallies]
    return {job.name: (tally.report(), tally.lengths) for job, tally in zip(jobs, merged)}

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
                   side: str = "end") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render, tokenize (batched, fast tokenizer) and mask one split.

    Each read and learnt piece of the text (see :func:`pipeline.prompting.templates.segments`) is
    tokenized on its own and the pieces concatenated, so the label mask is exact and
    generation at evaluation time starts from exactly the ids before the last answer.
    Labels cover every assistant turn (``train_on: all_assistant``) or only the last
    (``last_assistant``, or ``last_only``). Over-long rows are removed (``drop``) or, with
    ``truncate``, re-rendered with their user content cut (:func:`fit`; ``side``: its ``end``
    or ``middle``), so the template, the instruction and the answers stay whole; a row that
    still cannot fit is removed. Both are counted.
    ``encoder`` (a :class:`PieceEncoder`, shared across splits) gives the ids; by default a new one.
    """
    rows, truncated, dropped = _rows(examples, template, tokenizer, max_length, (overflow, side), last_only, pool,
                                     encoder)
    return rows, Tally.of(rows, truncated, dropped).report()


Encoder = Callable[[list[str], bool], list[list[int]]]


def _rows(examples: list[dict[str, Any]], template: Template, tokenizer: Any, max_length: int,
          overflow: tuple[str, str], last_only: bool, pool: ShotPool | None, encoder: Encoder | None,
          ) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """:func:`tokenize_split`'s rows, and the ids it truncated and the rows it dropped (with reasons).

    ``overflow`` is ``(prompt.overflow, prompt.truncate_side)``.
    """
    shots = [pool.draw(ex, template.k_shot, template.shot_seed) if pool else () for ex in examples]
    pieces = [segments(ex, template, s) for ex, s in zip(examples, shots)]
    last_only = last_only or template.train_on == "last_assistant"
    # Two batched calls for the whole split: first pieces get the tokenizer's special tokens (BOS).
    encoder = encoder or PieceEncoder(tokenizer)
    first_ids = encoder([p[0][0] for p in pieces], True)
    rest_ids = iter(encoder([t for p in pieces for t, _ in p[1:]], False))
    rows, truncated, dropped = [], [], []
    for ex, shown, parts, head in zip(examples, shots, pieces, first_ids):
        piece_ids = [head] + [next(rest_ids) for _ in parts[1:]]
        if len(parts) < 2 or not piece_ids[-1]:
            raise ValueError(f"render: example {ex['id']!r} has no completion tokens (empty output?)")
        ids, labels = _masked(parts, piece_ids, last_only)
        if len(ids) > max_length:
            fitted = f"longer than max_length={max_length}" if overflow[0] == "drop" or \
                len(piece_ids[-1]) >= max_length else \
                fit(ex, shown, template, tokenizer, encoder, max_length, last_only, overflow[1])
            if isinstance(fitted, str):
                dropped.append({"id": ex["id"], "reason": fitted})
                continue
            parts, ids, labels = fitted
            truncated.append(ex["id"])
        rows.append({
            "id": ex["id"], "task": ex["task"], "task_type": ex["task_type"],
            "prompt": "".join([t for t, _ in parts[:-1]]), "completion": parts[-1][0],
            "input_ids": ids, "labels": labels,
        })
    return rows, truncated, dropped


def _masked(parts: Sequence[tuple[str, bool]], piece_ids: Sequence[list[int]], last_only: bool,
            ) -> tuple[list[int], list[int]]:
    """One row's ids and labels from its pieces' ids: learnt pieces (all, or the last) get labels."""
    ids: list[int] = []
    labels: list[int] = []
    for k, ((_, learnt), piece) in enumerate(zip(parts, piece_ids)):
        ids += piece
        keep = learnt and k > 0 and (k == len(parts) - 1 or not last_only)
        labels += piece if keep else [IGNORE_INDEX] * len(piece)
    return ids, labels


MARK = " … "  # where a middle cut joined the two ends of the user content
_MAX_TRIES = 8  # re-renders per row: cutting n tokens of the content alone removes about n from the row


def fit(example: dict[str, Any], shots: Sequence[dict[str, Any]], template: Template, tokenizer: Any,
        encoder: Encoder, max_length: int, last_only: bool, side: str = "end",
        ) -> tuple[list[tuple[str, bool]], list[int], list[int]] | str:
    """An over-long example re-rendered with its user content cut until the row fits ``max_length``:
    its pieces, ids and labels; or the reason it cannot fit (the row is then dropped).

    Only the user content is cut (:func:`user_content`), at its ``end`` or ``middle`` (the two ends
    joined by :data:`MARK`), on token boundaries; the text is then rendered and tokenized as any
    other, so the template's tokens, the instruction, the exemplars and every answer stay whole.
    """
    text, put = user_content(example)
    offsets = [start for start, _ in tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets]
    cut = 0
    for _ in range(_MAX_TRIES):
        parts = segments(put(_cut(text, offsets, len(offsets) - cut, side)) if cut else example, template, shots)
        pieces = encoder([parts[0][0]], True) + encoder([t for t, _ in parts[1:]], False)
        ids, labels = _masked(parts, pieces, last_only)
        if len(ids) <= max_length:
            return parts, ids, labels
        cut += len(ids) - max_length
        if cut >= len(offsets):
            break
    return (f"longer than max_length={max_length} with its user content cut to nothing "
            "(template, instruction and answer alone do not fit)")


def user_content(example: dict[str, Any]) -> tuple[str, Callable[[str], dict[str, Any]]]:
    """The text truncation may cut, and how to put a shortened one back into the example.

    A conversation's last user turn; else the ``input``; else, for an example whose whole
    prompt is its instruction (prompt/completion data), the instruction.
    """
    messages = example.get("messages")
    if messages:
        last = max((i for i, t in enumerate(messages) if t["role"] == "user"), default=None)
        if last is None:  # no user turn: nothing that may be cut
            return "", lambda text: example

        def put_turn(text: str) -> dict[str, Any]:
            return {**example, "messages": [*messages[:last], {**messages[last], "content": text},
                                            *messages[last + 1:]]}
        return messages[last]["content"], put_turn
    key = "input" if example.get("input") else "instruction"
    return example[key], lambda text: {**example, key: text}


def _cut(text: str, starts: list[int], keep: int, side: str) -> str:
    """``text`` with only ``keep`` of its tokens (which start at ``starts``), from its start (``end``: the
    end is cut) or half from each end (``middle``)."""
    if keep <= 0:
        return ""
    if side == "end":
        return text[:starts[keep]].rstrip()
    head, tail = (keep + 1) // 2, keep // 2
    return text[:starts[head]].rstrip() + MARK + (text[starts[len(starts) - tail]:].lstrip() if tail else "")


@dataclasses.dataclass(frozen=True)
class Tally:
    """What a split's report is made of, from some of its rows: chunks' tallies add up."""

    lengths: list[int]  # tokens per row
    loss_tokens: int
    truncated: list[str]  # ids
    dropped: list[dict[str, Any]]  # {id, reason}
    tasks: list[str] = dataclasses.field(default_factory=list)  # task of each row
    truncated_tasks: list[str] = dataclasses.field(default_factory=list)  # task of each truncated row

    @classmethod
    def of(cls, rows: list[dict[str, Any]], truncated: list[str], dropped: list[dict[str, Any]]) -> "Tally":
        cut = set(truncated)
        return cls([len(r["input_ids"]) for r in rows],
                   sum(len(r["labels"]) - r["labels"].count(IGNORE_INDEX) for r in rows), truncated, dropped,
                   [r["task"] for r in rows], [r["task"] for r in rows if r["id"] in cut])

    @classmethod
    def merged(cls, parts: Sequence["Tally"]) -> "Tally":
        """One tally of a split from its chunks' tallies, in order."""
        return cls([n for t in parts for n in t.lengths], sum(t.loss_tokens for t in parts),
                   [i for t in parts for i in t.truncated], [d for t in parts for d in t.dropped],
                   [k for t in parts for k in t.tasks], [k for t in parts for k in t.truncated_tasks])

    def report(self) -> dict[str, Any]:
        """Rows, tokens, the loss-bearing share, lengths, and what was truncated (per task too) or dropped."""
        total, lengths = sum(self.lengths), sorted(self.lengths)
        return {
            "rows": len(lengths),
            "tokens": total,
            "loss_token_fraction": self.loss_tokens / total if total else 0.0,
            "max_length_seen": lengths[-1] if lengths else 0,
            "median_length": lengths[len(lengths) // 2] if lengths else 0,
            "truncated": len(self.truncated),
            "truncated_by_task": {task: {"truncated": self.truncated_tasks.count(task), "rows": self.tasks.count(task)}
                                  for task in sorted(set(self.truncated_tasks))},
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
    overflow: tuple[str, str]  # (prompt.overflow, prompt.truncate_side)
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


def render_jobs(jobs: list[Job], tokenizer: Any, overflow: tuple[str, str], pool: ShotPool | None, out: Path,
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

"""Stage 3, render: prompt template -> tokenized training rows with exact label masks.

Reads ``prompt`` from params.yaml, the prepared splits and the base tokenizer. Writes
per split ``<split>.jsonl`` rows ``{id, task, task_type, prompt, completion, input_ids,
labels}`` where ``labels`` is ``-100`` on every token that is not an assistant answer,
plus ``template.json`` (the template and its hash) to ``--out``, a report of lengths,
truncations, drops and the fraction of loss-bearing tokens to ``--report``, and a
token-length histogram to ``--plot``. A ``prompt.template_file`` is read here, at the
entry point. DVC re-runs this stage only when the prepared data, the tokenizer, this
code or the ``prompt`` params change: that is the render cache. An encoder base
(``model_info.json`` kind ``sequence_classification``) gets text + label-id rows of the
classification tasks and ``labels.json`` instead (:mod:`pipeline.training.encoder`).

Rows are rendered in chunks by one forked process per CPU (:func:`render_jobs`); the
files are the same bytes as one process writes. The tokenizer is loaded with
``tokenizers`` alone when its files are what the base_model stage recorded
(:func:`pipeline.core.models.load_fast_tokenizer`): importing transformers would cost more
than rendering a small dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import shutil
import sys
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from pipeline.core import config
from pipeline.core import parallel
from pipeline.training.encoder import LABELS_FILE, LabelError, label_map, render_rows, template_info
from pipeline.core.files import atomic_dir, jsonl_bytes, read_jsonl, write_json, write_jsonl
from pipeline.core.models import IGNORE_INDEX, load_fast_tokenizer, load_tokenizer, model_kind
from pipeline.prompting.templates import PromptError, Template, make_template, read_template_file, segments
from pipeline.prompting.shots import ShotPool

SPLITS = ("train", "val", "test")


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
    return rows, _report(*_tally(rows, truncated, dropped))


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


Tally = tuple[list[int], int, list[str], list[dict[str, Any]]]  # row lengths, loss tokens, truncated ids, drops


def _tally(rows: list[dict[str, Any]], truncated: list[str], dropped: list[dict[str, Any]]) -> Tally:
    """What a report is made of, from some of a split's rows (chunks' tallies add up)."""
    return ([len(r["input_ids"]) for r in rows], sum(len(r["labels"]) - r["labels"].count(IGNORE_INDEX) for r in rows),
            truncated, dropped)


def _merged(parts: Sequence[Tally]) -> Tally:
    """One tally of a split from its chunks' tallies, in order."""
    return ([n for t in parts for n in t[0]], sum(t[1] for t in parts), [i for t in parts for i in t[2]],
            [d for t in parts for d in t[3]])


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
    and the rows' :func:`_tally`. Rows stay out of the pipe to the parent: it only appends files."""
    j, start, stop = task
    job = work.jobs[j]
    rows, truncated, dropped = _rows(job.examples[start:stop], job.template, work.tokenizer, job.max_length,
                                     work.overflow, job.last_only, work.pool if job.template.k_shot else None,
                                     work.encoder)
    part = work.out / f".{job.name}.{start:012d}.part"
    part.write_bytes(jsonl_bytes(rows))
    return part, _tally(rows, truncated, dropped)


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
    done = {}
    for job, parts in zip(jobs, tallies):
        tally = _merged(parts)
        done[job.name] = (_report(*tally), tally[0])
    return done


def encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of ``texts``, as ``tokenizer(texts, add_special_tokens=special)`` gives them, faster.

    Each distinct text is tokenized once (answers such as a class label repeat thousands
    of times), and a fast tokenizer's Rust backend is called directly: the Python
    wrapper around it costs as much as the tokenization itself on short texts.
    """
    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    if getattr(tokenizer, "is_fast", False):
        encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(unique, add_special_tokens=special)]
    else:
        encoded = tokenizer(unique, add_special_tokens=special)["input_ids"]
    ids = dict(zip(unique, encoded))
    return [ids[t] for t in texts]


class PieceEncoder:
    """:func:`encode`, but tokenizing each distinct *piece* of text once, across calls.

    A fast tokenizer splits out its added (special) tokens before anything else, so the
    text between them is tokenized on its own: cutting there and concatenating the ids
    is exact. The chat template's system prompt, role headers and a task's instruction
    repeat in every example, and k-shot exemplars repeat train rows, so most pieces
    are cache hits. With GPT-2's byte-level pre-tokenizer, text of plain ASCII is cut
    into that pre-tokenizer's own words (BPE never merges across them), so a new example
    costs dictionary lookups for the words it shares with earlier ones; other text is cut
    before a newline that follows a non-space, where no pre-token spans either.

    Two levels, two caches: a text is cut at its special tokens (a fast literal search),
    each *segment* between them is looked up whole (a k-shot exemplar's turn is the same
    segment in every prompt it is shown in), and only a new segment is cut into pieces
    (words, or lines), each looked up in turn.

    Tokenizers where that does not hold (a normalizer, a prefix space per piece,
    added tokens that strip whitespace, a slow tokenizer) are detected from their
    settings and get :func:`encode`; the first batch is also checked against it, and a
    single difference turns piece encoding off (``self.pieces`` says which path runs).
    """

    def __init__(self, tokenizer: Any, sample: int = 64):
        self.tokenizer = tokenizer
        self.sample = sample
        self.checked: set[bool] = set()  # the `special` values checked against `encode`
        self.cache: dict[str, list[int]] = {}  # piece -> ids
        self.segment_cache: dict[str, list[int]] = {}  # text between special tokens (or one) -> ids
        cutters = _piece_splitter(tokenizer)
        self.segment, self.cut = cutters or (None, None)
        self.pieces = cutters is not None
        if self.pieces:  # what add_special_tokens=True puts around a text (e.g. BOS)
            backend = tokenizer.backend_tokenizer
            bare, full = (backend.encode("a", add_special_tokens=s).ids for s in (False, True))
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
            self.affixes = (full[:at], full[at + len(bare):]) if at is not None else None
            self.pieces = at is not None

    def splitter(self, text: str) -> list[str]:
        """The pieces ``text`` is tokenized in (both levels of cuts)."""
        return [piece for segment in self.segment(text) for piece in self.cut(segment)]

    def __call__(self, texts: list[str], special: bool) -> list[list[int]]:
        if not self.pieces:
            return encode(self.tokenizer, texts, special)
        if special not in self.checked:
            self.checked.add(special)
            head = list(dict.fromkeys(texts))[:self.sample]
            if self._encode(head, special) != encode(self.tokenizer, head, special):
                self.pieces = False
                return encode(self.tokenizer, texts, special)
        return self._encode(texts, special)

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        parts = [self.segment(t) for t in texts]
        new = list(dict.fromkeys(p for ps in parts for p in ps if p not in self.segment_cache))
        if new:
            cuts = [self.cut(segment) for segment in new]
            fresh = list(dict.fromkeys(p for ps in cuts for p in ps if p not in self.cache))
            if fresh:
                batch = self.tokenizer.backend_tokenizer.encode_batch(fresh, add_special_tokens=False)
                self.cache.update(zip(fresh, (e.ids for e in batch)))
            piece = self.cache.__getitem__
            self.segment_cache.update(zip(new, (list(chain.from_iterable(map(piece, ps))) for ps in cuts)))
        segment = self.segment_cache.__getitem__
        out = [list(chain.from_iterable(map(segment, ps))) for ps in parts]
        prefix, suffix = self.affixes if special else ([], [])
        return [prefix + ids + suffix for ids in out] if prefix or suffix else out


# GPT-2's byte-level pre-tokenizer regex (tokenizers' ByteLevel, use_regex), with \p{L} and
# \p{N} written out for ASCII: on text of printable ASCII, tab, newline and carriage return
# it cuts exactly where the tokenizer does (not on \x1c, which Python's \s takes and the
# tokenizer's does not: such text is cut at newlines), and BPE never merges across those
# cuts, so each word is tokenized once and looked up after.
_ASCII_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_OUTSIDE_PLAIN = re.compile(r"[^\t\n\r\x20-\x7e]")  # any other character: cut at newlines only


def _piece_splitter(tokenizer: Any) -> tuple[Callable[[str], list[str]], Callable[[str], list[str]]] | None:
    """How to cut a text into pieces that tokenize independently, or None where cutting is not exact:
    at (and around) its added tokens, then each segment between them into its words (plain
    ASCII) or before its newlines."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    if backend.normalizer is not None or backend.truncation or backend.padding:
        return None
    if pre is not None and not (type(pre).__name__ == "ByteLevel" and not pre.add_prefix_space):
        return None  # e.g. Metaspace: each piece would get its own prefix space
    added = list(backend.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    contents = {t.content for t in added}
    # Longest first: Python's alternation takes the first that matches, the tokenizer the longest.
    at_specials = re.compile("(" + "|".join(re.escape(t.content) for t in sorted(added, key=lambda t: -len(t.content)))
                             + ")")  # literals only: a fast search; the group keeps the tokens
    # Not at a segment's start: the text before it ends with a special token, a cut already.
    at_newlines = re.compile(r"(?=\n)(?<=\S)") if pre is not None and pre.use_regex else None

    def segment(text: str) -> list[str]:
        return [p for p in at_specials.split(text) if p]

    def cut(text: str) -> list[str]:
        if at_newlines is None or text in contents:  # an added token is one piece
            return [text]
        if _OUTSIDE_PLAIN.search(text) is None:  # plain ASCII: the pre-tokenizer's own words
            return _ASCII_WORDS.findall(text)
        return [p for p in at_newlines.split(text) if p]

    return segment, cut


def _report(lengths: list[int], loss_tokens: int, truncated: list[str], dropped: list[dict[str, Any]]
            ) -> dict[str, Any]:
    total = sum(lengths)
    lengths = sorted(lengths)
    return {
        "rows": len(lengths),
        "tokens": total,
        "loss_token_fraction": loss_tokens / total if total else 0.0,
        "max_length_seen": lengths[-1] if lengths else 0,
        "median_length": lengths[len(lengths) // 2] if lengths else 0,
        "truncated": len(truncated),
        "dropped": len(dropped),
        "dropped_rows": dropped,
    }


@parallel.paused_gc()  # row work: no reference cycles to collect (see paused_gc)
def run(prompt_cfg: config.PromptConfig, prepared: Path, base_model: Path, out: Path, report_path: Path,
        plot_path: Path | None = None) -> dict[str, Any]:
    """Render every split of ``prepared`` into ``out`` atomically; write the report and the length plot.

    The test split's labels are its last answer only, whatever ``train_on`` says: that
    is the answer evaluation generates and scores. k-shot exemplars come from train.
    """
    if model_kind(base_model) == "sequence_classification":
        return run_encoder(prompt_cfg, prepared, base_model, out, report_path, plot_path)
    tokenizer = load_fast_tokenizer(base_model)
    template = make_template(prompt_cfg, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    splits = {split: read_jsonl(prepared / f"{split}.jsonl") for split in SPLITS}
    pool = ShotPool(splits["train"]) if template.k_shot or prompt_cfg.eval_k_shot else None
    # The test split's labels are its last answer only: the answer evaluation generates and scores.
    jobs = [Job(split, examples, template, prompt_cfg.max_length, split == "test")
            for split, examples in splits.items()]
    kshot = dataclasses.replace(template, k_shot=prompt_cfg.eval_k_shot)
    if prompt_cfg.eval_k_shot:
        jobs.append(kshot_job(splits["test"], kshot, prompt_cfg))
    with atomic_dir(out) as tmp:
        done = render_jobs(jobs, tokenizer, prompt_cfg.overflow, pool, tmp)
        write_json(tmp / "template.json", template.to_dict())
        if prompt_cfg.eval_k_shot:
            write_json(tmp / "template_kshot.json", kshot.to_dict())
    report = {"template": template.name, "template_hash": template.hash(),
              "splits": {split: done[split][0] for split in SPLITS}}
    if prompt_cfg.eval_k_shot:
        report["kshot_arm"] = done[KSHOT][0]
    return _finish(report, report_path, {split: done[split][1] for split in SPLITS}, plot_path,
                   prompt_cfg.max_length)


def _finish(report: dict[str, Any], report_path: Path, lengths: dict[str, list[int]], plot_path: Path | None,
            limit: int) -> dict[str, Any]:
    """Write the report and, when asked, the token-length histogram per split."""
    write_json(report_path, report)
    if plot_path is not None:
        from pipeline.core.plots import length_histograms

        length_histograms(lengths, "tokens per example", plot_path, limit=limit)
    return report


def run_encoder(prompt_cfg: config.PromptConfig, prepared: Path, base_model: Path, out: Path, report_path: Path,
                plot_path: Path | None = None) -> dict[str, Any]:
    """The encoder's render: text + label id per classification row, the label map, the same report and plot.

    The base checkpoint says which kind of model it is (``model_info.json``), so this
    stage needs no model params; rows of other task types are counted in ``skipped``.
    """
    tokenizer = load_tokenizer(base_model)
    splits = {split: read_jsonl(prepared / f"{split}.jsonl") for split in SPLITS}
    labels = label_map(splits)
    if not labels["labels"]:
        raise LabelError(f"render: {prepared / 'train.jsonl'} has no classification task, which an encoder "
                                 "classifier needs (the data must say so, e.g. data.task_type=classification)")
    template = template_info(prompt_cfg.include_instruction, prompt_cfg.max_length, labels)
    report: dict[str, Any] = {"template": template["name"], "template_hash": template["hash"],
                              "labels": labels["labels"], "splits": {}}
    lengths = {}
    with atomic_dir(out) as tmp:
        for split, examples in tqdm(splits.items(), desc="render", unit="split", disable=None):
            rows, report["splits"][split] = render_rows(examples, labels, tokenizer,
                                                                 prompt_cfg.include_instruction, prompt_cfg.max_length)
            write_jsonl(tmp / f"{split}.jsonl", rows)
            lengths[split] = [len(r["input_ids"]) for r in rows]
        write_json(tmp / "template.json", template)
        write_json(tmp / LABELS_FILE, labels)
    return _finish(report, report_path, lengths, plot_path, prompt_cfg.max_length)


KSHOT = "test_kshot"  # the k-shot arm's file: test_kshot.jsonl, with its own template_kshot.json


def kshot_job(test: list[dict[str, Any]], kshot: Template, prompt_cfg: config.PromptConfig) -> Job:
    """The test split with ``eval_k_shot`` train exemplars before each prompt: the base model's k-shot arm.

    ``template.json`` stays the training template, so evaluate's template guard still
    checks the tuned model. The length limit is ``max_length`` per shown example (k
    exemplars + the question): cutting exemplars to the training limit would truncate the
    very context this arm is about.
    """
    return Job(KSHOT, test, kshot, prompt_cfg.max_length * (prompt_cfg.eval_k_shot + 1), True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, required=True, help="prepare stage output directory")
    parser.add_argument("--base-model", type=Path, required=True, help="base_model stage output (tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="directory for rendered <split>.jsonl")
    parser.add_argument("--report", type=Path, required=True, help="render report JSON to write")
    parser.add_argument("--plot", type=Path, help="PNG histogram of token lengths per split")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    try:
        prompt_cfg = read_template_file(cfg.prompt)
        report = run(prompt_cfg, args.prepared, args.base_model, args.out, args.report, args.plot)
    except (PromptError, LabelError) as err:
        print(f"render: error: {err}", file=sys.stderr)
        return 1
    for split, r in report["splits"].items():
        share = f"{r['loss_token_fraction']:.1%} loss-bearing" if "loss_token_fraction" in r else \
            f"skipped (not classification): {r['skipped'] or 'none'}"
        print(f"render: {split}: {r['rows']} rows, {r['tokens']} tokens, "
              f"{share}, {r['truncated']} truncated, {r['dropped']} dropped")
    return 0


if __name__ == "__main__":
    from pipeline.cli import guard

    sys.exit(guard("render", main))

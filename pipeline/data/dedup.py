"""Duplicates and train/eval contamination: exact after normalization, near (MinHash), n-gram overlap.

Each check returns the rows it flags as ``{"id", "reason", ...}`` records; the prepare
stage decides (from ``data.dedup``) whether flagged rows are removed or only reported.
Texts are compared after :func:`normalize` (Unicode NFKC, case folding, whitespace), so
"Hello  World" and "hello world" are the same row.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from pipeline.core import parallel
from pipeline.data.schema import Example

Flag = dict[str, Any]


def normalize(text: str) -> str:
    """Text as compared: NFKC (full-width and ligature forms folded), case-folded, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_text(ex: Example) -> str:
    """What the model is asked: every turn but the last answer, or instruction + input."""
    if ex.messages:
        return "\n".join(m["content"] for m in ex.messages[:-1])
    return f"{ex.instruction}\n{ex.input}"


def full_text(ex: Example) -> str:
    """The prompt and the answer together."""
    return f"{prompt_text(ex)}\n{ex.output}"


def exact_duplicates(examples: list[Example], keys: Sequence[tuple[str, ...]] | None = None) -> list[Flag]:
    """Rows whose task and normalized text equal an earlier row's (ids are ignored).

    ``keys``, when given, are the rows' :func:`exact_key` values, already computed.
    """
    seen: dict[tuple[str, ...], str] = {}
    flags = []
    for ex, key in zip(examples, keys if keys is not None else map(exact_key, examples)):
        if key in seen:
            flags.append({"id": ex.id, "reason": "exact_duplicate", "duplicate_of": seen[key]})
        else:
            seen[key] = ex.id
    return flags


def exact_key(ex: Example) -> tuple[str, ...]:
    """What exact duplicates share: the task and each field, normalized."""
    # Fields stay apart: ("a b", "") and ("a", "b") as instruction and input are different rows.
    turns = tuple(f"{m['role']}: {normalize(m['content'])}" for m in ex.messages or ())
    return (ex.task, _normalize_repeated(ex.instruction), normalize(ex.input), normalize(ex.output), *turns)


@functools.lru_cache(maxsize=4096)
def _normalize_repeated(text: str) -> str:
    """:func:`normalize` for text that repeats across rows (a task's instruction), computed once each."""
    return normalize(text)


def _shingles(text: str, size: int) -> set[bytes]:
    words = normalize(text).split()
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def near_duplicates(examples: list[Example], threshold: float, shingle: int, num_perm: int,
                    seed: int = 1) -> list[Flag]:
    """Rows whose word-shingle set is about as similar as ``threshold`` (Jaccard) to an earlier row
    of the same task, found with MinHash LSH (datasketch); each flag names the row it repeats and
    the estimated similarity. The earlier row is kept, so the result does not depend on which
    pairs LSH happens to bucket together.
    """
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    # Shingling and hashing (most of the time) run in forked workers on large inputs; the LSH is one index.
    hashes = parallel.map_rows(_minhashes, (examples, shingle, num_perm, seed), len(examples))
    kept: dict[str, tuple[Example, Any]] = {}
    flags = []
    for ex, mh in zip(examples, hashes):
        best, best_sim = None, 0.0
        for key in lsh.query(mh):
            other, other_mh = kept[key]
            sim = mh.jaccard(other_mh)
            if other.task == ex.task and sim >= threshold and sim > best_sim:
                best, best_sim = other.id, sim
        if best is None:
            key = str(len(kept))  # ids need not be unique across sources; insertion order is
            lsh.insert(key, mh)
            kept[key] = (ex, mh)
        else:
            flags.append({"id": ex.id, "reason": "near_duplicate", "duplicate_of": best,
                          "similarity": round(best_sim, 3)})
    return flags


def _minhashes(state: tuple[list[Example], int, int, int], task: tuple[int, int]) -> list[Any]:
    """MinHashes of the rows ``task`` covers, as LeanMinHash: the same hash values, compact to send back."""
    from datasketch import LeanMinHash, MinHash

    examples, shingle, num_perm, seed = state
    sets = (_shingles(full_text(ex), shingle) for ex in examples[task[0]:task[1]])
    return [LeanMinHash(m) for m in MinHash.bulk(sets, num_perm=num_perm, seed=seed)]


def _windows(text: str, n: int) -> Iterable[tuple[str, ...]]:
    """The ``n``-word windows of ``text``'s words as :func:`normalize` gives them, in order (built in C)."""
    words = unicodedata.normalize("NFKC", text).casefold().split()  # normalize's words, without the join
    return zip(*[words[i:] for i in range(n)]) if n >= 1 else [()]


# A text in fewer rows than this is never a task's template, whatever share of the task they are:
# in a task of a few rows, two questions about one passage would otherwise make it a template.
TEMPLATE_MIN_ROWS = 5


# A task's template is what most of its rows repeat: its document frequencies are estimated on
# at most this many of its rows (evenly spaced, so the same rows every run). At 30% of a task,
# an item is seen in 30% +- 3.6% of 1,000 rows (two standard errors): the same templates as a
# full count, at 100k rows a tenth of the time.
TEMPLATE_SAMPLE = 1000


def frequent(items: Sequence[Any], tasks: Sequence[str], template_df: float,
             of: Callable[[Any], set[Any]] | None = None) -> dict[str, set[Any]]:
    """Per task, the items (lines, n-grams) that more than ``template_df`` of its rows hold, and at
    least :data:`TEMPLATE_MIN_ROWS`: the task's template, shared by design. Row ``i``'s items are
    ``of(items[i])`` (``items[i]`` itself by default); a task of many rows is counted on
    :data:`TEMPLATE_SAMPLE` of them."""
    if template_df >= 1:  # nothing is held by more than all of a task's rows
        return {task: set() for task in tasks}
    rows: dict[str, list[Any]] = {}
    for task, row in zip(tasks, items):
        rows.setdefault(task, []).append(row)
    out = {}
    for task, mine in rows.items():
        sample = mine[::-(-len(mine) // TEMPLATE_SAMPLE)]  # every k-th row, at most TEMPLATE_SAMPLE of them
        counts: Counter[Any] = Counter()
        for row in sample:
            counts.update(of(row) if of is not None else row)
        least = max(TEMPLATE_MIN_ROWS * len(sample) / len(mine), 1)  # TEMPLATE_MIN_ROWS of the whole task
        out[task] = {item for item, n in counts.items() if n > template_df * len(sample) and n >= least}
    return out


def contamination(train: list[Example], held_out: list[Example], ngram: int, threshold: float,
                  template_df: float = 1.0) -> list[Flag]:
    """Train rows that leak a val/test row: the same prompt exactly, or at least ``threshold`` of
    the train row's word ``ngram``-grams occurring in some val/test row.

    N-grams come from the example-specific text (input and answer, or the instruction and
    answer when there is no input): an instruction shared by a whole task family would
    otherwise make every row of that task look contaminated. For the same reason a prompt or
    n-gram that more than ``template_df`` of a task's rows hold (train and val/test together,
    see :func:`frequent`) is the task's template and no evidence; a row with nothing else is not checked.
    """
    every = train + held_out
    tasks = [ex.task for ex in every]
    template = frequent(every, tasks, template_df, lambda ex: {_prompt_key(ex)})
    for task, grams in frequent(every, tasks, template_df,
                                lambda ex: set(_windows(_specific_text(ex), ngram))).items():
        template[task] |= grams
    # Train rows are checked in forked workers when there are many; each process builds the
    # val/test prompt index and n-gram set itself on first use, so the workers build them side by side.
    return parallel.map_rows(_leaks, _LeakCheck(train, held_out, ngram, threshold, template), len(train))


@dataclasses.dataclass
class _LeakCheck:
    """What :func:`_leaks` needs; the val/test index and n-grams are built once per process, when first used."""

    train: list[Example]
    held_out: list[Example]
    ngram: int
    threshold: float
    template: dict[str, set[Any]]  # per task: its template prompt and n-grams, no evidence of a leak

    @functools.cached_property
    def prompts(self) -> dict[tuple[str, ...], str]:
        return {_prompt_key(ex): ex.id for ex in self.held_out}

    @functools.cached_property
    def held_grams(self) -> set[tuple[str, ...]]:
        grams: set[tuple[str, ...]] = set()
        for ex in self.held_out:
            grams.update(_windows(_specific_text(ex), self.ngram))
        return grams


def _leaks(check: _LeakCheck, task: tuple[int, int]) -> list[Flag]:
    prompts, held_grams, ngram, threshold = check.prompts, check.held_grams, check.ngram, check.threshold
    flags = []
    for ex in check.train[task[0]:task[1]]:
        template = check.template.get(ex.task, set())
        key = _prompt_key(ex)
        same = None if key in template else prompts.get(key)
        if same is not None:
            flags.append({"id": ex.id, "reason": "contamination_exact", "overlaps": same})
            continue
        grams = set(_windows(_specific_text(ex), ngram)) - template
        if grams:
            ratio = len(grams & held_grams) / len(grams)
            if ratio >= threshold:
                flags.append({"id": ex.id, "reason": "contamination_ngram", "overlap_ratio": round(ratio, 3)})
    return flags


def _prompt_key(ex: Example) -> tuple[str, ...]:
    if ex.messages:
        return tuple(normalize(m["content"]) for m in ex.messages[:-1])
    return (_normalize_repeated(ex.instruction), normalize(ex.input))  # == exact_key(ex)[1:3]


def _specific_text(ex: Example) -> str:
    if ex.messages:
        return full_text(ex)
    return f"{ex.input or ex.instruction}\n{ex.output}"

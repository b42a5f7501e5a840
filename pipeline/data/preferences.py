"""Preference pairs (prompt, chosen, rejected) for the align stage, normalized to :class:`Example`.

A pair is an :class:`Example` whose ``output`` is the chosen answer and whose
``meta["rejected"]`` is the rejected one, so the instruction data's own code applies to it
unchanged: rendering (``prompting/``), splits, exact dedup, contamination against the
instruction test split and the safety rules (:func:`clean`).

Formats read from a file (``.jsonl``/``.json``/``.csv``/``.parquet``, through the same
reader as instruction data, so a bad row is reported as ``file:line: field: message``):

- ``standard`` (TRL): ``prompt``, ``chosen``, ``rejected`` strings;
- ``conversational`` (TRL): ``prompt`` a list of ``{role, content}`` messages, ``chosen`` and
  ``rejected`` one-message assistant lists;
- ``hh_rlhf`` (Anthropic HH-RLHF): ``chosen`` and ``rejected`` full transcripts sharing a
  ``\\n\\nHuman: ... \\n\\nAssistant:`` prefix; the prompt is their longest common prefix cut
  at its last ``\\n\\nAssistant:``, and each answer is the rest.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.data import dedup, embedded, formats
from pipeline.data.schema import Example, Problem, ProblemCollector

PAIR_FORMATS = ("standard", "conversational", "hh_rlhf")
TASK = "preference"  # the task name of pairs read from a file
ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = ("system", "user", "assistant")

Report = Callable[[str | None, str], None]


def from_examples(examples: Sequence[Example], seed: int) -> list[Example]:
    """The embedded generator's pairs for the prepared examples it made: chosen is the reference,
    rejected a plausible wrong answer (:func:`pipeline.data.embedded.rejected`); others are left out."""
    out = []
    for ex in examples:
        wrong = embedded.rejected(ex, seed)
        if wrong is not None:
            out.append(dataclasses.replace(ex, meta={**ex.meta, "rejected": wrong}))
    return out


def rejected(pair: Example) -> Example:
    """The pair's rejected side as an example of its own (what rendering needs)."""
    wrong = pair.meta["rejected"]
    messages = None if pair.messages is None else [*pair.messages[:-1], {"role": "assistant", "content": wrong}]
    return dataclasses.replace(pair, output=wrong, messages=messages)


def load_file(path: str | Path, format: str = "auto", max_chars: int = 100_000, limit: int = 20) -> list[Example]:
    """Every pair of a preference file; every bad row reported at once (``file:line: field: message``)."""
    problems = ProblemCollector(limit=limit)
    rows = formats._read_rows(Path(path), problems)  # the instruction data's reader: same errors, same types
    name, pairs, first_line = str(path), [], {}
    stem = Path(path).stem
    for line, row in rows:
        def report(field: str | None, message: str, line: int = line, row: Any = row) -> None:
            problems.add(Problem(name, line, field, message, row))

        if not isinstance(row, dict):
            report(None, f"expected an object with prompt/chosen/rejected, got {type(row).__name__}")
            continue
        kind = format if format != "auto" else detect(row)
        pair = _pair(row, kind, report, max_chars) if kind else None
        if kind is None:
            report(None, "not a preference pair: expected prompt, chosen and rejected (TRL), or chosen and "
                         "rejected full transcripts (HH-RLHF)")
        if pair is not None:
            pid = str(row.get("id", f"{stem}-{line}"))
            if pid in first_line:  # pairs are matched by id later: a repeated id would mix two pairs
                report("id", f"duplicate id {pid!r} (first on line {first_line[pid]})")
                continue
            first_line[pid] = line
            pairs.append(_example(pair, pid, kind))
    problems.raise_if_any()
    return pairs


def detect(row: dict[str, Any]) -> str | None:
    """The format of one row: conversational when ``prompt`` is a list, standard when a string, hh_rlhf
    when there is no prompt but ``chosen`` and ``rejected``."""
    if "chosen" not in row or "rejected" not in row:
        return None
    if "prompt" not in row:
        return "hh_rlhf"
    return "conversational" if isinstance(row["prompt"], list) else "standard"


def _pair(row: dict[str, Any], kind: str, report: Report, max_chars: int) -> tuple[Any, str, str] | None:
    """(prompt: a string or messages, chosen, rejected), or None when the row was reported bad."""
    if kind == "hh_rlhf":
        chosen, wrong = (formats._text(row, k, report, max_chars, k, True) for k in ("chosen", "rejected"))
        return split_hh(chosen, wrong, report) if chosen and wrong else None
    if kind == "standard":
        parts = [formats._text(row, k, report, max_chars, k, True) for k in ("prompt", "chosen", "rejected")]
        return (parts[0], parts[1], parts[2]) if all(parts) else None
    prompt = _messages(row.get("prompt"), "prompt", report)
    answers = [_answer(row.get(k), k, report) for k in ("chosen", "rejected")]
    if prompt is None or None in answers:
        return None
    if prompt[-1]["role"] != "user":
        report("prompt", f"the last message must be a user turn, got {prompt[-1]['role']!r}")
        return None
    return prompt, answers[0], answers[1]  # type: ignore[return-value]


def split_hh(chosen: str, wrong: str, report: Report) -> tuple[str, str, str] | None:
    """HH-RLHF: the shared prompt (up to and including the last common ``\\n\\nAssistant:``) and the two answers."""
    common = os.path.commonprefix([chosen, wrong])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        report("chosen", "chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
        return None
    end = cut + len(ASSISTANT)
    prompt, a, b = chosen[:end], chosen[end:].strip(), wrong[end:].strip()
    if not a or not b:
        report("chosen" if not a else "rejected", "is empty after the shared prompt")
        return None
    if a == b:
        report("rejected", "equals chosen")
        return None
    return prompt, a, b


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """An HH-RLHF prompt as chat messages: each ``Human:``/``Assistant:`` turn, the final empty one dropped."""
    pieces = _HH_TURN.split(prompt)
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(pieces[1::2], pieces[2::2])]
    return [t for t in turns if t["content"]]


def _messages(value: Any, field: str, report: Report) -> list[dict[str, str]] | None:
    if not isinstance(value, list) or not value:
        report(field, "expected a non-empty list of {role, content} messages")
        return None
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str) \
                or not m["content"].strip():
            report(f"{field}[{i}]", f"expected {{role: {'|'.join(_ROLES)}, content: non-empty string}}")
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: Any, field: str, report: Report) -> str | None:
    messages = _messages(value, field, report)
    if messages is None:
        return None
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        report(field, "expected exactly one assistant message")
        return None
    return messages[0]["content"]


def _example(pair: tuple[Any, str, str], row_id: str, kind: str) -> Example:
    prompt, chosen, wrong = pair
    if kind == "hh_rlhf":
        prompt = hh_messages(prompt)
    meta = {"rejected": wrong}
    if isinstance(prompt, str):
        return Example(id=row_id, task=TASK, task_type="free_text", instruction=prompt, input="", output=chosen,
                       source="file", meta=meta)
    first_user = next(m["content"] for m in prompt if m["role"] == "user")
    return Example(id=row_id, task=TASK, task_type="free_text", instruction=first_user, input="", output=chosen,
                   source="file", meta=meta, messages=[*prompt, {"role": "assistant", "content": chosen}])


def clean(pairs: list[Example], held_out: list[Example], rules: Any, ngram: int, threshold: float
          ) -> tuple[list[Example], dict[str, int]]:
    """Pairs without exact duplicates, leaks of the instruction ``held_out`` rows, unsafe prompts or chosen
    answers (the rejected side may be unsafe: DPO pushes it down), or chosen == rejected; and the counts."""
    counts = {"read": len(pairs)}
    same = {p.id for p in pairs if dedup.normalize(p.output) == dedup.normalize(p.meta["rejected"])}
    # A pair is a duplicate only if its rejected answer repeats too: binarised datasets pair one
    # (prompt, chosen) with several rejected answers, each a pair of its own.
    dupes = {f["id"] for f in dedup.exact_duplicates(
        [dataclasses.replace(p, output=f"{p.output}\n\x1e{p.meta['rejected']}") for p in pairs])}
    leaks = {f["id"] for f in dedup.contamination(pairs, held_out, ngram, threshold)} if held_out else set()
    unsafe = {p.id for p in pairs if rules.check(_safety_text(p))}
    for name, ids in (("chosen_equals_rejected", same), ("exact_duplicate", dupes), ("contamination", leaks),
                      ("safety", unsafe)):
        counts[name] = len(ids)
    bad = same | dupes | leaks | unsafe
    kept = [p for p in pairs if p.id not in bad]
    counts["kept"] = len(kept)
    return kept, counts


def _safety_text(pair: Example) -> str:
    """What prepare reviews of an instruction row: the prompt and the answer trained towards."""
    return dedup.full_text(pair) if pair.messages is None else "\n".join(m["content"] for m in pair.messages)

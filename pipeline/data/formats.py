"""Load raw instruction data (local files or the Hugging Face hub) into :class:`Example`s.

Every source is turned into ``(line, row)`` pairs first; one shared path then maps
columns, detects the format, normalizes and validates. Problems name ``file:line: field``
and are raised together as one :class:`DataError`, never as a library traceback.
Heavy libraries (``datasets``, ``pyarrow``) are imported inside the functions that use
them so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.data.schema import TASK_TYPES, DataError, Example, Problem, ProblemCollector

FORMATS = ("alpaca", "dolly", "prompt_completion", "self_instruct_seed", "sharegpt", "openai_chat", "auto")

# The keys that identify a format; a row matching exactly one of these sets is that format.
_SIGNATURES: dict[str, frozenset[str]] = {
    "alpaca": frozenset({"instruction", "output"}),
    "dolly": frozenset({"instruction", "response"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "self_instruct_seed": frozenset({"instruction", "instances"}),
    "sharegpt": frozenset({"conversations"}),
    "openai_chat": frozenset({"messages"}),
}
# Keys each format consumes (its signature plus optional ones); the rest of a row goes to meta.
_USED = {**_SIGNATURES, "alpaca": _SIGNATURES["alpaca"] | {"input"}, "dolly": _SIGNATURES["dolly"] | {"context"}}
# Tokenizer end-of-text markers some exports leave on completions; they are not the answer.
_EOT_MARKERS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>")
# Speaker names in ShareGPT exports (from FastChat, Vicuna, ...) -> OpenAI roles.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
_CHAT_KEYS = {"sharegpt": ("conversations", "from", "value"), "openai_chat": ("messages", "role", "content")}
_JSON_WS = re.compile(r"[ \t\n\r]*")

Row = tuple[int, Any]
Report = Callable[[str | None, str], None]


def load_file(path: str | Path, *, format: str = "auto", task: str | None = None, task_type: str | None = None,
              columns: Mapping[str, str] | None = None, max_problems: int = 20,
              max_field_chars: int = 20000, source: str | None = None,
              problems: ProblemCollector | None = None) -> list[Example]:
    """Load a .json (array of objects), .jsonl, .csv, .tsv or .parquet file as Examples.

    ``line`` in problems is the physical line for JSON Lines, JSON arrays (where the
    object starts) and CSV/TSV (the header is line 1; a record's first line), and the
    row index + 1 for parquet. A .json file whose first line is an object is read as JSON Lines.
    ``columns`` maps our field names to the file's (``{"output": "answer"}``).
    ``task``/``task_type`` override what rows say; ``source`` names the source in
    ``Example.source`` (default: the file name). Raises :class:`DataError` listing every
    problem found (up to ``max_problems``). Pass a ``problems`` collector made with
    ``skip=True`` to get the valid rows back and the bad ones (with their raw text) in it.
    """
    path = Path(path)
    problems = problems or ProblemCollector(limit=max_problems)
    rows = _read_rows(path, problems)
    ctx = _Context(str(path), source or path.name, path.stem, path.stem, dict(columns or {}), task, task_type,
                   max_field_chars, problems)
    return _examples_from_rows(rows, format, ctx)


def load_hub(name: str, *, split: str = "train", config: str | None = None, revision: str | None = None,
             format: str = "auto", task: str | None = None, task_type: str | None = None,
             columns: Mapping[str, str] | None = None, max_problems: int = 20,
             max_field_chars: int = 20000, source: str | None = None,
             problems: ProblemCollector | None = None) -> list[Example]:
    """Load a hub dataset (or a local ``save_to_disk`` directory) split as Examples.

    Validation is the same as :func:`load_file`, with ``file = name`` and ``line = row
    index + 1``. Default ids are ``f"{basename}-{split}-{line}"`` so splits never collide.
    """
    import datasets  # slow import; only hub users pay for it

    local = Path(name)
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError([Problem(name, None, None, f"no split {split!r}; splits are {sorted(loaded)}")])
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(name, config, split=split, revision=revision)
    problems = problems or ProblemCollector(limit=max_problems)
    base = local.name or name
    ctx = _Context(name, source or name, base, f"{base}-{split}", dict(columns or {}), task, task_type,
                   max_field_chars, problems)
    return _examples_from_rows(list(enumerate(loaded, start=1)), format, ctx)


# ---------------------------------------------------------------- reading files


def _read_rows(path: Path, problems: ProblemCollector) -> list[Row]:
    file, suffix = str(path), path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix not in (".json", ".jsonl", ".csv", ".tsv"):
        raise DataError([Problem(file, None, None, f"unsupported file type {suffix!r}; "
                                 "expected .json, .jsonl, .csv, .tsv or .parquet")])
    lines = _decode_lines(path.read_bytes(), file, problems)
    if suffix == ".jsonl" or (suffix == ".json" and _is_json_object(next((ln for ln in lines if ln), ""))):
        return _jsonl_rows(lines, file, problems)  # a .json file holding JSON Lines is common enough
    problems.stop()  # a whole-file format cannot be parsed around an undecodable line
    text = "\n".join(line or "" for line in lines)
    if suffix == ".json":
        return _json_array_rows(text, file, problems)
    return _csv_rows(text, "\t" if suffix == ".tsv" else ",", file, problems)


def _decode_lines(data: bytes, file: str, problems: ProblemCollector) -> list[str | None]:
    # Decoding line by line is what lets a bad byte be reported as file:line.
    lines: list[str | None] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.add(Problem(file, number, None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} "
                                 f"at column {e.start + 1}", raw.decode("utf-8", "backslashreplace")))
            lines.append(None)
    if lines and lines[0]:
        lines[0] = lines[0].removeprefix("\ufeff")  # spreadsheet exports often start with a BOM
    return lines


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _jsonl_rows(lines: list[str | None], file: str, problems: ProblemCollector) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(lines, start=1):
        if line is None or not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.add(Problem(file, number, None, f"invalid JSON: {e.msg} at column {e.colno}", line))
        except RecursionError:
            problems.add(Problem(file, number, None, "invalid JSON: nested too deeply", line))
    return rows


def _json_array_rows(text: str, file: str, problems: ProblemCollector) -> list[Row]:
    # Decode element by element (not json.loads on the whole text) to know each row's line.
    decoder, rows = json.JSONDecoder(), []
    line, counted = 1, 0

    def skip(i: int) -> int:
        return _JSON_WS.match(text, i).end()  # type: ignore[union-attr]  # always matches

    def line_at(i: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, i), i
        return line

    def fail(at_line: int, message: str) -> list[Row]:
        problems.add(Problem(file, at_line, None, message))
        problems.stop()
        return rows  # unreachable: stop raised

    i = skip(0)
    if i == len(text):
        return rows
    if text[i] != "[":
        return fail(line_at(i), "expected a JSON array of objects (or one object per line)")
    i = skip(i + 1)
    while not text.startswith("]", i):
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            return fail(e.lineno, f"invalid JSON: {e.msg} at column {e.colno}")
        except RecursionError:
            return fail(line_at(i), "invalid JSON: nested too deeply")
        rows.append((line_at(i), value))
        i = skip(end)
        if text.startswith(",", i):
            i = skip(i + 1)
            if text.startswith("]", i):  # json.loads rejects this too; stay as strict
                return fail(line_at(i), "invalid JSON: trailing comma before ']'")
        elif not text.startswith("]", i):
            return fail(line_at(i), "invalid JSON: expected ',' or ']' after an array element")
    if skip(i + 1) != len(text):
        return fail(line_at(skip(i + 1)), "invalid JSON: extra data after the array")
    return rows


def _csv_rows(text: str, delimiter: str, file: str, problems: ProblemCollector) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[Row] = []
    try:
        header = [name.strip() for name in next(reader, [])]
        if len(set(header)) != len(header):
            problems.add(Problem(file, 1, None, f"duplicate column names in the header: {header}"))
        start = reader.line_num + 1  # a record may span lines; report the line where it starts
        for cells in reader:
            number, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) > len(header):
                problems.add(Problem(file, number, None, f"{len(cells)} cells but the header has {len(header)}",
                                     cells))
                continue
            rows.append((number, dict(zip(header, cells))))  # a short row simply lacks keys
    except csv.Error as e:  # e.g. a NUL byte, or a field over csv.field_size_limit()
        problems.add(Problem(file, reader.line_num, None, f"invalid CSV/TSV: {e}"))
        problems.stop()
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, ValueError) as e:
        raise DataError([Problem(str(path), None, None, f"cannot read parquet: {e}")]) from e
    return list(enumerate(table.to_pylist(), start=1))  # line = row index + 1


# ------------------------------------------------------ normalizing and validating


@dataclass
class _Context:
    """What every row of one source shares: where it came from and what the caller asked."""

    file: str
    source: str
    task_default: str
    id_stem: str
    columns: dict[str, str]
    task: str | None
    task_type: str | None
    max_chars: int
    problems: ProblemCollector

    def label(self, key: str) -> str:
        # Name the user's column too, since that is what they will search their file for.
        return f"{key} (column {self.columns[key]!r})" if key in self.columns else key


def _examples_from_rows(rows: list[Row], format: str, ctx: _Context) -> list[Example]:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    problems = ctx.problems
    if ctx.task_type is not None and ctx.task_type not in TASK_TYPES:
        problems.add(Problem(ctx.file, None, "task_type", f"{ctx.task_type!r} is not one of {TASK_TYPES}"))
    mapped: list[tuple[int, dict[str, Any], Any]] = []  # line, renamed row, row as read
    for line, row in rows:
        if isinstance(row, dict):
            mapped.append((line, _rename(row, ctx.columns), row))
        else:
            problems.add(Problem(ctx.file, line, None, f"expected an object, got {_describe(row)}", _json_safe(row)))
    if not rows and not problems.problems:
        problems.add(Problem(ctx.file, None, None, "the file has no rows"))
    if not mapped:  # otherwise keep collecting: field problems are reported with parse problems
        problems.stop()
    if format == "auto":
        format = _detect((mapped[0][0], mapped[0][1]), ctx) if mapped else "alpaca"
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for line, row, raw in mapped:
        for example in _normalize(row, line, format, ctx, raw):
            if example.id in first_line:  # report the second occurrence, pointing at the first
                problems.add(Problem(ctx.file, line, "id", f"duplicate id {example.id!r} "
                                     f"(first at line {first_line[example.id]})", _json_safe(raw)))
                break
            first_line[example.id] = line
            examples.append(example)
    problems.raise_if_any()
    return examples


def _rename(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    theirs = set(columns.values())
    out = {k: v for k, v in row.items() if k not in theirs}
    out.update({ours: row[col] for ours, col in columns.items() if col in row})
    return out


def _detect(first: Row, ctx: _Context) -> str:
    line, row = first
    keys = set(row)
    matches = [name for name, sig in _SIGNATURES.items() if sig <= keys]
    if len(matches) == 1:
        return matches[0]
    known = "; ".join(f"{name} ({', '.join(sorted(sig))})" for name, sig in _SIGNATURES.items())
    if matches:
        message = f"ambiguous format: keys {sorted(keys)} match {', '.join(matches)}; pass format= to choose"
    else:
        message = (f"cannot detect the format from keys {sorted(keys)}; known formats: {known}; "
                   "pass format= or columns= to map your column names")
    ctx.problems.add(Problem(ctx.file, line, None, message))
    ctx.problems.stop()
    return ""  # unreachable


def _normalize(row: dict[str, Any], line: int, format: str, ctx: _Context, raw: Any = None) -> list[Example]:
    """One row -> its Examples; on any problem in the row, report it and return none."""
    before = len(ctx.problems.problems)

    def report(field: str | None, message: str) -> None:
        ctx.problems.add(Problem(ctx.file, line, field, message, _json_safe(row if raw is None else raw)))

    def text(key: str, required: bool = True, data: dict[str, Any] = row, label: str = "") -> str | None:
        return _text(data, key, report, ctx.max_chars, label or ctx.label(key), required)

    row_id = _row_id(row, line, ctx, report)
    used = set(_USED[format]) | {"id", "task", "task_type"}
    # Precedence: the caller's argument, then the row's own task/task_type, then format hints.
    task = ctx.task or text("task", False) or None
    task_type = ctx.task_type or text("task_type", False) or None
    pieces: list[tuple[str, str | None, str | None, str | None, dict[str, Any]]] = []  # id, ins, inp, out, extra
    messages: list[dict[str, str]] | None = None
    if format in _CHAT_KEYS:
        messages = _conversation(row, format, ctx, report)
        first_user = next((m["content"] for m in messages if m["role"] == "user"), None)
        pieces.append((row_id, first_user, "", messages[-1]["content"] if messages else None, {}))
    elif format == "self_instruct_seed":
        task, task_type = _seed_task(row, ctx, report, text, used, task, task_type)
        pieces += _seed_instances(row, row_id, ctx, report, text)
    elif format == "prompt_completion":
        prompt, completion = text("prompt"), text("completion")
        if completion and not _strip_eot(completion):
            report(ctx.label("completion"), "is empty once end-of-text markers are removed")
        pieces.append((row_id, prompt and prompt.strip(), "", completion and _strip_eot(completion), {}))
    else:
        dolly = format == "dolly"
        if dolly and not task:
            task = text("category", False) or None
            used.add("category")
        pieces.append((row_id, text("instruction"), text("context" if dolly else "input", False),
                       text("response" if dolly else "output"), {}))
    task_type = task_type or "free_text"
    if task_type not in TASK_TYPES:
        report(ctx.label("task_type"), f"{task_type!r} is not one of {TASK_TYPES}")
    if len(ctx.problems.problems) > before:
        return []
    meta = {k: _json_safe(v) for k, v in row.items() if k not in used}
    return [Example(id=ex_id, task=task or ctx.task_default, task_type=task_type, instruction=ins or "",
                    input=inp or "", output=out or "", source=ctx.source, meta={**meta, **_json_safe(extra)},
                    messages=messages)
            for ex_id, ins, inp, out, extra in pieces]


def _seed_task(row: dict[str, Any], ctx: _Context, report: Report, text: Callable[..., str | None], used: set[str],
               task: str | None, task_type: str | None) -> tuple[str | None, str]:
    """A self-instruct seed task's name (its task) and ``is_classification`` (its type), unless given."""
    if not task:
        task = text("name", False) or None
        used.add("name")
    if not task_type:
        is_cls = row.get("is_classification")
        if is_cls is not None and not isinstance(is_cls, bool):
            report(ctx.label("is_classification"), f"expected true/false, got {_describe(is_cls)}")
        task_type = "classification" if is_cls is True else "free_text"
        used.add("is_classification")
    return task, task_type


def _seed_instances(row: dict[str, Any], row_id: str, ctx: _Context, report: Report,
                    text: Callable[..., str | None]) -> list[tuple[str, str | None, str | None, str | None, dict]]:
    """One (id, instruction, input, output, extra) piece per instance of a self-instruct seed task."""
    instruction, instances = text("instruction"), row.get("instances")
    if not isinstance(instances, list) or not instances:
        report(ctx.label("instances"), "missing" if instances is None else
               f"expected a non-empty list of {{input, output}} objects, got {_describe(instances)}")
        return []
    pieces = []
    for k, inst in enumerate(instances):
        where = f"{ctx.label('instances')}[{k}]"
        if not isinstance(inst, dict):
            report(where, f"expected an object, got {_describe(inst)}")
            continue
        extra = {key: v for key, v in inst.items() if key not in ("input", "output")}
        pieces.append((f"{row_id}-{k}", instruction, text("input", False, inst, f"{where}.input"),
                       text("output", True, inst, f"{where}.output"), extra))
    return pieces


def _conversation(row: dict[str, Any], format: str, ctx: _Context, report: Report) -> list[dict[str, str]]:
    """A ShareGPT ``conversations`` or OpenAI ``messages`` list as validated OpenAI-style turns.

    A conversation is an optional leading system turn, then user and assistant turns
    starting with a user turn and ending with an assistant turn (the answer that is
    learnt and evaluated). Problems name the turn: ``messages[2].content``.
    """
    key, role_key, text_key = _CHAT_KEYS[format]
    turns = row.get(key)
    label = ctx.label(key)
    if not isinstance(turns, list) or not turns:
        report(label, "missing" if turns is None else f"expected a non-empty list of turns, got {_describe(turns)}")
        return []
    out: list[dict[str, str]] = []
    for k, turn in enumerate(turns):
        where = f"{label}[{k}]"
        if not isinstance(turn, dict):
            report(where, f"expected an object with {role_key!r} and {text_key!r}, got {_describe(turn)}")
            continue
        speaker = turn.get(role_key)
        role = (_SHAREGPT_ROLES.get(speaker.lower()) if format == "sharegpt" else
                speaker if speaker in ("system", "user", "assistant") else None) if isinstance(speaker, str) else None
        if role is None:
            allowed = sorted(_SHAREGPT_ROLES) if format == "sharegpt" else ["assistant", "system", "user"]
            report(f"{where}.{role_key}", f"{_describe(speaker)} is not one of {', '.join(allowed)}")
            continue
        content = _text(turn, text_key, report, ctx.max_chars, f"{where}.{text_key}", role != "system")
        if content is None:
            continue
        if role == "system" and k > 0:
            report(f"{where}.{role_key}", "a system turn may only come first")
        out.append({"role": role, "content": content})
    if len(out) == len(turns):
        dialogue = [m["role"] for m in out if m["role"] != "system"]
        if not dialogue or dialogue[0] != "user":
            report(label, "the conversation must start with a user turn (after an optional system turn)")
        elif dialogue[-1] != "assistant":
            report(label, "the conversation must end with an assistant turn")
    return out


def _text(data: dict[str, Any], key: str, report: Report, max_chars: int, label: str,
          required: bool) -> str | None:
    """The string at ``key``; a required one must also be non-blank. Reports and returns None if bad."""
    value = data.get(key)
    if value is None:
        if required:
            report(label, "missing" if key not in data else "is null, expected a string")
        return None if required else ""
    if not isinstance(value, str):  # numbers are not coerced: a number where text belongs is a bug
        report(label, f"expected a string, got {_describe(value)}")
        return None
    if len(value) > max_chars:
        report(label, f"is {len(value)} characters long, more than max_field_chars={max_chars}")
        return None
    if required and not value.strip():
        report(label, "is empty")
        return None
    return value


def _row_id(row: dict[str, Any], line: int, ctx: _Context, report: Report) -> str:
    value = row.get("id")
    if value is None:
        return f"{ctx.id_stem}-{line}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        report(ctx.label("id"), f"expected a string or integer, got {_describe(value)}")
    elif not str(value).strip():
        report(ctx.label("id"), "is empty")
    return str(value)


def _strip_eot(text: str) -> str:
    text = text.strip()
    while text.endswith(_EOT_MARKERS):  # several markers may be stacked
        marker = next(m for m in _EOT_MARKERS if text.endswith(m))
        text = text[: -len(marker)].rstrip()
    return text


def _describe(value: Any) -> str:
    name = "null" if value is None else type(value).__name__
    shown = repr(value)
    return f"{name} {shown[:40] + '...' if len(shown) > 40 else shown}"


def _json_safe(value: Any) -> Any:
    # Meta is written to JSON later; parquet/hub rows may hold dates, bytes or numpy values.
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError, RecursionError):
        return str(value)

"""Writing stage outputs so that a failed stage leaves nothing a later stage could read.

Every output directory is built under a temporary sibling and renamed into place only
when complete (``atomic_dir``); single files go through a temporary file + ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` on success.

    On any exception the temporary directory is removed and ``path`` is left as it was
    (DVC has already removed declared outputs before the stage runs, so nothing partial
    survives a failure).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file via a temporary sibling and an atomic rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# One encoder for every row: json.dumps(..., ensure_ascii=False) builds a new one per call.
_JSONL = json.JSONEncoder(ensure_ascii=False)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    encode = _JSONL.encode
    write_text_atomic(path, "".join(encode(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file (blank lines skipped), as ``json.loads`` reads each line.

    Lines are parsed by orjson, several times faster; the few it refuses and ``json``
    accepts (``NaN``, integers beyond 64 bits) go through ``json``, so the values are the same.
    """
    loads = orjson.loads
    with open(path, "rb") as fh:
        data = fh.read()
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(loads(line))
        except orjson.JSONDecodeError:
            rows.append(json.loads(line))
    return rows


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """JSON Lines of rows of strings, integers and lists/dicts of them (render's token rows), by orjson.

    Compact (``[1,2]``, no spaces) and UTF-8; orjson writes a float NaN as ``null``, so
    rows that may carry floats from user data go through :func:`write_jsonl` instead.
    """
    dumps = orjson.dumps
    return b"".join([dumps(row) + b"\n" for row in rows])


def hash_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the names and bytes of files (directories walked in sorted order)."""
    digest = hashlib.sha256()
    for root in sorted(Path(p) for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(str(f.relative_to(root.parent)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()

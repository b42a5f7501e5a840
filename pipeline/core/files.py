"""Writing stage outputs so that a failed stage leaves nothing a later stage could read.

Every output directory is built under a temporary sibling and renamed into place only
when complete (``atomic_dir``); single files go through a temporary file + ``os.replace``.
``tempfile`` creates those private (0700 / 0600); they get the mode a plain ``mkdir`` or
``open`` would have given under the process umask before they are renamed, so a shared
cache or output directory stays readable by the group the umask allows.
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
    os.chmod(tmp, 0o777 & ~current_umask())
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
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes | bytearray) -> None:
    """:func:`write_text_atomic` for bytes."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON Lines (:func:`jsonl_bytes`), atomically."""
    write_bytes_atomic(path, jsonl_bytes(rows))


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


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytearray:
    """JSON Lines of ``rows``: compact, UTF-8, each line read back (:func:`read_jsonl`) as the row's values.

    orjson writes each row, several times faster than ``json``. A row it would write
    differently from ``json``'s values goes through ``json`` (compact too): a NaN or
    infinity, which orjson writes as ``null`` (so any line with a ``null`` is redone), and
    what orjson refuses (non-string keys, integers beyond 64 bits, numpy scalars).
    """
    dumps = orjson.dumps
    out = bytearray()  # each line appended and freed at once: a list of 100k live lines costs 5x more
    for row in rows:
        try:
            line = dumps(row)
        except TypeError:  # orjson.JSONEncodeError is one
            line = b"null"
        if b"null" in line:
            line = _JSON_COMPACT(row).encode("utf-8")
        out += line
        out += b"\n"
    return out


# One encoder for every row: json.dumps(..., ensure_ascii=False) builds a new one per call.
_JSON_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


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

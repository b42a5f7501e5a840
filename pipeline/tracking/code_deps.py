"""The code each stage runs, derived from its imports: what ``dvc.yaml`` must list as deps.

A stage's code is the import closure of its entry module within ``pipeline/``: every
``import`` and ``from ... import`` anywhere in a file (inside functions too, since the
stages import heavy libraries lazily), except those under ``if TYPE_CHECKING:``, which
never run. Package ``__init__.py`` files hold only a docstring (a test checks it), so
they are not listed.

``python -m pipeline.params`` writes these lists into ``dvc.yaml`` (:func:`sync_dvc_yaml`),
and a test fails, naming the stage and the module, when ``dvc.yaml`` has drifted. The
Hydra app's stage cache (:mod:`pipeline.tracking.stage_cache`) keys on the same lists, so
an edit to any module a stage runs re-runs it under both runners.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

PACKAGE = "pipeline"


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers of statements under ``if TYPE_CHECKING:`` (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _module_file(root: Path, dotted: str) -> Path | None:
    """``pipeline.a.b`` -> ``pipeline/a/b.py`` (or the package's ``__init__.py``); None if neither exists."""
    base = root.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(path: Path, root: Path) -> tuple[str, ...]:
    """Dotted names of the ``pipeline`` modules ``path`` imports (a ``from pkg import name`` that
    names a submodule counts as that submodule)."""
    stat = path.stat()
    return _imported_modules(path, root, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=None)
def _imported_modules(path: Path, root: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    """:func:`imported_modules`, parsed once per version of the file (its time and size are the key)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _module_file(root, sub) else node.module)
    return tuple(sorted(found))


def closure(entry: str, root: Path) -> list[str]:
    """Files (relative to ``root``, posix) of every ``pipeline`` module ``entry`` runs, itself included."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(root, name)
        if path is None:
            raise ImportError(f"{entry} imports {name}, which is not a module under {root / PACKAGE}")
        # Importing pipeline.a.b runs pipeline/a/__init__.py first: follow the parents too.
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += imported_modules(path, root)
    files = {_module_file(root, n) for n in seen}
    return sorted(str(f.relative_to(root).as_posix()) for f in files if f is not None and f.name != "__init__.py")


def stage_entry(cmd: str) -> str | None:
    """``python -m pipeline.train --out ...`` -> ``pipeline.train``."""
    match = re.search(r"python\S* -m (pipeline(?:\.\w+)+)", cmd)
    return match.group(1) if match else None


def stage_code(stages: dict, root: Path) -> dict[str, list[str]]:
    """Each ``dvc.yaml`` stage's code deps, from the entry module its ``cmd`` runs."""
    out = {}
    for name, st in stages.items():
        entry = stage_entry(" ".join(str(st["cmd"]).split()))
        if entry is not None:
            out[name] = closure(entry, root)
    return out


def listed_code(stage: dict) -> list[str]:
    """The ``pipeline/`` paths a ``dvc.yaml`` stage lists among its deps."""
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return sorted(d for d in deps if d.startswith(f"{PACKAGE}/"))


def sync_dvc_yaml(text: str, wanted: dict[str, list[str]]) -> str:
    """``dvc.yaml``'s text with each stage's ``pipeline/`` deps replaced by ``wanted[stage]``.

    A textual edit, so that comments and the order of everything else survive: the code
    lines of each stage's ``deps:`` list (with any comment on them) are removed and the
    derived ones written at the top of the list.
    """
    lines, out, stage, in_deps = text.split("\n"), [], None, False
    for line in lines:
        top = re.match(r"^  ([\w.-]+):\s*$", line)
        if top:
            stage, in_deps = top.group(1), False
        if stage in wanted and re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out += [f"      - {f}" for f in wanted[stage]]
            continue
        if in_deps and re.match(r"^    \S", line):
            in_deps = False
        if in_deps and re.match(rf"^      - {PACKAGE}/\S*\s*(#.*)?$", line):
            continue
        out.append(line)
    return "\n".join(out)


def drift(stages: dict, root: Path) -> dict[str, dict[str, list[str]]]:
    """Per stage, the code deps ``dvc.yaml`` misses (``missing``) and lists needlessly (``extra``)."""
    out = {}
    for name, wanted in stage_code(stages, root).items():
        listed = listed_code(stages[name])
        missing, extra = sorted(set(wanted) - set(listed)), sorted(set(listed) - set(wanted))
        if missing or extra:
            out[name] = {"missing": missing, "extra": extra}
    return out


def module_graph(root: Path) -> dict[str, tuple[str, ...]]:
    """Every module under ``pipeline/`` and the ``pipeline`` modules it imports (dotted names)."""
    graph = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = imported_modules(path, root)
    return graph

"""Content-addressed outputs of the stages every job of a sweep shares.

A sweep over ``trainer.lr`` should tokenize once. The Hydra app (:mod:`pipeline.app`)
keeps the outputs of ``base_model``, ``prepare``, ``render`` and ``train_encoder`` under
``<cache>/<stage>/<key>/``, where the key hashes exactly what DVC would track for that
stage: its params sections, its code and the keys of the stages it reads from. Those
lists are read from ``dvc.yaml`` (the one place they are written), so the cache and
``dvc repro`` can never disagree about what invalidates a stage.

Builds take a file lock per key, so parallel jobs (``hydra/launcher=joblib``) build
each entry once and the others wait and reuse it. Every build is appended to
``<cache>/builds.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from pipeline.core.files import atomic_dir, read_json, write_json

MANIFEST = "key.json"  # written last inside an entry: its presence means "complete"


@dataclass(frozen=True)
class StageSpec:
    """What invalidates one stage, as declared in ``dvc.yaml``."""

    name: str
    params: tuple[str, ...]  # top-level params sections
    code: tuple[str, ...]  # deps no stage produces (code, raw data)
    inputs: tuple[tuple[str, str], ...]  # (dep path, producing stage)


def _path(entry: Any) -> str:
    """A dvc.yaml deps/outs entry is a path or ``{path: options}``."""
    return entry if isinstance(entry, str) else next(iter(entry))


def read_specs(dvc_yaml: Path) -> dict[str, StageSpec]:
    """Every stage's params sections, code deps and upstream stages, from ``dvc_yaml``."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    producer = {_path(o): name for name, st in stages.items() for o in st.get("outs", [])}
    specs = {}
    for name, st in stages.items():
        deps = [_path(d) for d in st.get("deps", [])]
        params = [p for p in st.get("params", []) if isinstance(p, str)]
        specs[name] = StageSpec(name, tuple(params), tuple(d for d in deps if d not in producer),
                                tuple((d, producer[d]) for d in deps if d in producer))
    return specs


def code_hash(root: Path, paths: Sequence[str]) -> str:
    """sha256 over the relative names and bytes of ``paths`` (directories walked, caches skipped)."""
    digest = hashlib.sha256()
    for rel in sorted(paths):
        top = root / rel
        files = sorted(f for f in top.rglob("*") if f.is_file()) if top.is_dir() else [top]
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue  # bytecode differs between interpreters, not between code versions
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def stage_keys(specs: Mapping[str, StageSpec], params: Mapping[str, Any], root: Path,
               stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{stage: {"key": hex, "inputs": ...}}`` for ``stages``, given in dependency order."""
    out: dict[str, dict[str, Any]] = {}
    for name in stages:
        spec = specs[name]
        missing = [producer for _, producer in spec.inputs if producer not in out]
        if missing:
            raise ValueError(f"stage {name!r} reads from {missing}: list those stages before it")
        recipe = {
            "stage": name,
            "params": {section: params.get(section) for section in spec.params},
            "code": code_hash(root, spec.code),
            "inputs": {dep: out[producer]["key"] for dep, producer in spec.inputs},
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]
        out[name] = {**recipe, "key": key}
    return out


def entry(cache: Path, stage: str, key: str) -> Path:
    """The directory that holds (or will hold) ``stage``'s output for ``key``."""
    return cache / stage / key


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def build_once(cache: Path, stage: str, recipe: Mapping[str, Any], build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return ``(entry dir, built_now)``; run ``build(tmp_dir)`` only if no complete entry exists.

    ``build`` writes into a fresh directory that is renamed into place when it returns,
    so a crashed build leaves nothing a later job could mistake for a result.
    """
    from filelock import FileLock

    final = entry(cache, stage, recipe["key"])
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if is_complete(final):
            return final, False
        start = time.perf_counter()
        with atomic_dir(final) as tmp:
            build(tmp)
            write_json(tmp / MANIFEST, dict(recipe))
        with open(cache / "builds.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"stage": stage, "key": recipe["key"],
                                  "seconds": round(time.perf_counter() - start, 2)}) + "\n")
    return final, True


def builds(cache: Path) -> list[dict[str, Any]]:
    """Every build recorded in ``<cache>/builds.jsonl`` (empty if none)."""
    log = cache / "builds.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def recipe_of(path: Path) -> dict[str, Any]:
    """The recipe an entry was built from."""
    return read_json(path / MANIFEST)

"""The shape of the code, checked: dvc.yaml's code deps are each stage's import closure, the
layers point one way (entry points -> stages -> libraries) with no import cycle, package
``__init__`` files hold no code, and functions stay short enough to read whole."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.tracking.code_deps import closure, drift, module_graph, stage_code, sync_dvc_yaml

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"pipeline.app", "pipeline.__main__", "pipeline.compare", "pipeline.params", "pipeline.promote"}
STAGES = {"pipeline.base_model", "pipeline.prepare", "pipeline.render", "pipeline.train", "pipeline.train_encoder",
          "pipeline.align", "pipeline.evaluate", "pipeline.export"}
MAX_FUNCTION_LINES = 60


def _stages(root: Path = REPO) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_lists_exactly_the_code_it_runs() -> None:
    problems = drift(_stages(), REPO)
    assert not problems, ("dvc.yaml's code deps differ from the stages' imports (run `python -m pipeline.params`): "
                          + "; ".join(f"{stage} misses {p['missing']}, lists needlessly {p['extra']}"
                                      for stage, p in problems.items()))


def test_a_new_import_without_its_dep_is_named(tmp_path: Path) -> None:
    """Give a stage a (function-level) import its dvc.yaml entry lacks: the check names both."""
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    assert drift(_stages(tmp_path), tmp_path) == {}
    stage = tmp_path / "pipeline" / "base_model.py"
    stage.write_text(stage.read_text() + "\n\ndef _later() -> None:\n    from pipeline.evaluation import slices\n")
    assert drift(_stages(tmp_path), tmp_path) == {"base_model": {
        "missing": [f"pipeline/evaluation/{m}.py" for m in ("metrics", "resampling", "scoring", "slices")],
        "extra": []}}
    # The generator puts them in, and then the check passes again.
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(sync_dvc_yaml(dvc_yaml.read_text(), stage_code(_stages(tmp_path), tmp_path)))
    assert drift(_stages(tmp_path), tmp_path) == {}


def test_imports_under_type_checking_do_not_count(tmp_path: Path) -> None:
    pkg = tmp_path / "pipeline"
    (pkg / "lib").mkdir(parents=True)
    for f in ("__init__.py", "lib/__init__.py", "lib/a.py", "lib/b.py"):
        (pkg / f).write_text('"""doc"""\n')
    (pkg / "stage.py").write_text("from typing import TYPE_CHECKING\nfrom pipeline.lib import a\n"
                                  "if TYPE_CHECKING:\n    from pipeline.lib import b\n")
    assert closure("pipeline.stage", tmp_path) == ["pipeline/lib/a.py", "pipeline/stage.py"]


def _layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry point"
    if module in STAGES:
        return "stage"
    in_sub_package = module.count(".") >= 2 or (REPO / module.replace(".", "/") / "__init__.py").is_file()
    return "library" if in_sub_package else "unplaced"


def test_layers_point_one_way() -> None:
    graph = module_graph(REPO)
    assert [m for m in graph if _layer(m) == "unplaced" and m != "pipeline"] == [], \
        "every top-level module is a stage or an entry point; libraries live in sub-packages"
    wrong = []
    for module, imports in graph.items():
        for target in imports:
            here, there = _layer(module), _layer(target)
            if (here == "library" and there != "library") or (here == "stage" and there in ("stage", "entry point")
                                                                and target != module):
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert wrong == []


def test_no_import_cycle() -> None:
    graph = {m: [t for t in ts if t in module_graph(REPO)] for m, ts in module_graph(REPO).items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_package_init_files_hold_only_a_docstring() -> None:
    """Importing a module runs its packages' __init__ files, which the code deps leave out: so they must hold no code."""
    for init in (REPO / "pipeline").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init


@pytest.mark.parametrize("path", sorted((REPO / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_short_enough_to_read_whole(path: Path) -> None:
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # type: ignore[operator]
    assert long == []

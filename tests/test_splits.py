"""Leak-free splits (pipeline/data/splits.py): rows that share a context go to one split, templates are no
evidence of contamination, small tasks are pooled; on the shared real files when present, and always on
synthetic files of the same shapes."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import SHARED
from pipeline import prepare
from pipeline.core.config import GROUP_FIELDS, ConfigError, from_mapping
from pipeline.core.errors import DataError
from pipeline.core.files import read_jsonl
from pipeline.data import dedup, embedded, splits
from pipeline.data.schema import Example
from pipeline.params import compose

SELF_INSTRUCT = SHARED / "data" / "self-instruct"
ADVERSARIAL_QA = SELF_INSTRUCT / "t0" / "adversarial_qa_dbidaf_answer_the_following_q.jsonl"
T0_FILES = sorted((SELF_INSTRUCT / "t0").glob("*.jsonl"))
needs_shared = pytest.mark.skipif(not ADVERSARIAL_QA.is_file(), reason=f"{ADVERSARIAL_QA} not present")
PASSAGE = re.compile(r'passage\n\n"(.*)",\n', re.S)  # the adversarial_qa template around its passage


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def qa_rows(n_passages: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """adversarial_qa's shape: one template, several questions (1-8) about each passage."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_passages):
        passage = words(rng, 60)
        for _ in range(rng.randint(1, 8)):
            rows.append({"prompt": f'Given the following passage\n\n"{passage}",\n\nanswer the following question. '
                                   f"Note that the answer is present within the text.\n\nQuestion: {words(rng, 9)}\n",
                         "completion": passage.split()[rng.randrange(60)] + "<|endoftext|>"})
    return rows


def template_rows(n: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """A template-heavy file: a long template sentence around a short review in every prompt."""
    rng = random.Random(seed)
    return [{"prompt": "Read the following product review from an online shop carefully and then tell us whether "
                       f"the customer who wrote this review was happy with the product.\nReview: {words(rng, 6)}\n"
                       "Answer:\n", "completion": rng.choice(["Yes", "No"])} for _ in range(n)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepared(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run prepare on a composed config; its stats report and the rows of each split."""
    cfg = from_mapping(compose(list(overrides)))
    out = tmp_path / "prepared"
    report = prepare.run(cfg, prepare.Paths(out, tmp_path / "stats.json"))
    return report, {s: read_jsonl(out / f"{s}.jsonl") for s in splits.SPLITS}


def passages(rows: list[dict[str, Any]]) -> set[str]:
    return {m.group(1) for r in rows if (m := PASSAGE.search(r["instruction"]))}


def assert_no_passage_on_both_sides(parts: dict[str, list[dict[str, Any]]]) -> None:
    train, held = passages(parts["train"]), passages(parts["val"] + parts["test"])
    assert train and held and not train & held


def contamination_share(report: dict[str, Any]) -> float:
    dropped = sum(report["dedup"][r]["removed"] for r in ("contamination_exact", "contamination_ngram"))
    return dropped / (report["splits"]["train"] + dropped)


# --- grouping ---------------------------------------------------------------------


def ex(i: int, task: str = "t", instruction: str = "Q?", input: str = "", meta: dict | None = None) -> Example:
    return Example(id=f"{task}-{i:03d}", task=task, task_type="free_text", instruction=instruction, input=input,
                   output=f"a{i}", meta=meta or {})


def side(parts: dict[str, list[Example]]) -> dict[str, str]:
    return {e.id: s for s, rows in parts.items() for e in rows}


def test_auto_groups_rows_that_share_a_passage_and_never_splits_a_group(tmp_path: Path) -> None:
    data = write(tmp_path / "qa.jsonl", qa_rows())
    report, parts = prepared(tmp_path, "data=local", f"data.path={data}")
    assert_no_passage_on_both_sides(parts)
    assert report["split"]["groups"] == 40 and report["split"]["grouped_rows"] > 100
    assert contamination_share(report) == 0  # nothing left to find: no passage crosses
    assert report["splits"]["test"] == pytest.approx(0.2 * report["kept"], abs=8)  # stratified near the shares


def test_group_by_none_is_the_per_row_split_and_leaks_passages(tmp_path: Path) -> None:
    data = write(tmp_path / "qa.jsonl", qa_rows())
    report, parts = prepared(tmp_path, "data=local", f"data.path={data}", "data.group_by=none",
                             "data.dedup.contamination=report")
    assert passages(parts["train"]) & passages(parts["test"])
    assert report["dedup"]["contamination_ngram"]["found"] > 0.3 * report["splits"]["train"]


def test_grouped_split_is_deterministic_and_follows_the_seed() -> None:
    rows = [ex(i, task, input=f"passage {i // 3} " * 9) for task in ("a", "b") for i in range(60)]
    first = side(splits.split(rows, 0.1, 0.2, 42, "auto", 0.3))
    assert side(splits.split(list(reversed(rows)), 0.1, 0.2, 42, "auto", 0.3)) == first
    assert side(splits.split(rows, 0.1, 0.2, 43, "auto", 0.3)) != first
    for i in range(0, 60, 3):  # each passage's three rows on one side
        assert len({first[f"a-{j:03d}"] for j in range(i, i + 3)}) == 1


def test_a_passage_in_two_tasks_goes_to_one_split() -> None:
    rows = [ex(i, task, input=f"shared passage number {i} with enough words to matter") for task in ("a", "b")
            for i in range(30)]
    where = side(splits.split(rows, 0.1, 0.2, 0, "auto", 0.3))
    assert all(where[f"a-{i:03d}"] == where[f"b-{i:03d}"] for i in range(30))


def test_group_by_a_field_meta_column_or_regex() -> None:
    rows = [ex(i, input=f"doc {i % 7}", meta={"doc": i % 5}, instruction=f"About doc{i % 4}: question {i}?")
            for i in range(70)]
    for group_by, key in (("input", lambda e: e.input), ("meta.doc", lambda e: e.meta["doc"]),
                          (r"re:About (doc\d+)", lambda e: e.instruction.split(":")[0])):
        where = side(splits.split(rows, 0.1, 0.2, 0, group_by))
        by_key: dict[Any, set[str]] = {}
        for e in rows:
            by_key.setdefault(key(e), set()).add(where[e.id])
        assert all(len(s) == 1 for s in by_key.values()), group_by
    with pytest.raises(DataError, match="data.group_by: 'meta.nope' finds nothing"):
        splits.split(rows, 0.1, 0.2, 0, "meta.nope")


@pytest.mark.parametrize("n_per_task", [12, 120])  # +experiment=smoke's and the default's
def test_auto_does_not_group_by_the_template_or_paraphrased_instructions(n_per_task: int) -> None:
    # The embedded data: two instruction paraphrases per task, each in about half of the rows.
    rows = embedded.generate(1234, n_per_task)
    assert side(splits.split(rows, 0.1, 0.2, 42, "auto", 0.3)) == side(splits.split(rows, 0.1, 0.2, 42, "none"))
    assert splits.plan(rows, 0.1, 0.2, 42, "auto", 0.3).stats["grouped_rows"] == 0


def test_template_needs_its_share_and_five_rows() -> None:
    items = [{"tpl", f"own{i}"} | ({"pair"} if i < 2 else set()) for i in range(8)]
    assert dedup.frequent(items, ["t"] * 8, 0.3) == {"t": {"tpl"}}
    assert dedup.frequent(items[:4], ["t"] * 4, 0.3) == {"t": set()}  # in 4 rows: too few to be a template


# --- small tasks ------------------------------------------------------------------


def test_small_tasks_are_pooled_and_split_together() -> None:
    rows = [ex(0, f"tiny{t}") for t in range(30)] + [ex(i, "big") for i in range(20)]
    made = splits.plan(rows, 0.1, 0.2, 0)
    assert made.stats["pooled_tasks"] == sorted(f"tiny{t}" for t in range(30)) and made.stats["pooled_rows"] == 30
    tiny = {s: sum(e.task != "big" for e in r) for s, r in made.splits.items()}
    assert tiny == {"test": 6, "val": 3, "train": 21}
    big = {s: sum(e.task == "big" for e in r) for s, r in made.splits.items()}
    assert big == {"test": 4, "val": 2, "train": 14}  # a task big enough keeps its own split


def test_a_task_whose_rows_all_share_one_passage_is_pooled() -> None:
    # Four rows: too few for their passage to be the task's template (TEMPLATE_MIN_ROWS), so one group.
    rows = [ex(i, "one", input="the only passage " * 5) for i in range(4)] + [ex(i, "big") for i in range(20)]
    made = splits.plan(rows, 0.1, 0.2, 0, "auto", 0.3)
    assert made.stats["pooled_tasks"] == ["one"]
    assert len({s for s, r in made.splits.items() for e in r if e.task == "one"}) == 1


@pytest.mark.skipif(not (SELF_INSTRUCT / "seed_tasks.jsonl").is_file(), reason="seed_tasks.jsonl not present")
def test_seed_tasks_prepare_with_no_other_flag(tmp_path: Path) -> None:
    report, _ = prepared(tmp_path, "data=local", f"data.path={SELF_INSTRUCT / 'seed_tasks.jsonl'}")
    assert (report["loaded"], report["kept"]) == (175, 175)
    assert len(report["split"]["pooled_tasks"]) == 174 and report["split"]["pooled_rows"] == 175
    assert report["splits"] == {"train": 122, "val": 18, "test": 35}


# --- contamination ----------------------------------------------------------------


def test_a_template_is_no_evidence_of_contamination(tmp_path: Path) -> None:
    data = write(tmp_path / "reviews.jsonl", template_rows())
    before, _ = prepared(tmp_path, "data=local", f"data.path={data}", "data.group_by=none",
                         "data.dedup.template_df=1")  # the split and check before issue 18
    assert contamination_share(before) > 0.5  # every row looks like every other: the template's n-grams
    after, _ = prepared(tmp_path, "data=local", f"data.path={data}")
    assert contamination_share(after) <= 0.05


def test_a_real_leak_is_still_found_next_to_a_template() -> None:
    tpl = "Read the review below and tell us whether the customer liked the product they bought."
    rng = random.Random(1)
    held = [Example(f"h{i}", "t", "free_text", tpl, words(rng, 12), "Yes") for i in range(10)]
    train = [Example(f"r{i}", "t", "free_text", tpl, words(rng, 12), "No") for i in range(30)]
    train.append(Example("leak", "t", "free_text", tpl, held[0].input, "Yes"))
    flags = dedup.contamination(train, held, ngram=8, threshold=0.5, template_df=0.3)
    assert [f["id"] for f in flags] == ["leak"]


def test_a_prompt_shared_by_the_task_is_no_exact_leak() -> None:
    held = [Example(f"h{i}", "t", "free_text", "Tell me a joke.", "", f"joke {i}") for i in range(3)]
    train = [Example(f"r{i}", "t", "free_text", "Tell me a joke.", "", f"other joke {i}") for i in range(7)]
    assert dedup.contamination(train, held, ngram=8, threshold=0.5, template_df=0.3) == []
    assert len(dedup.contamination(train, held, ngram=8, threshold=0.5)) == 7  # template_df=1: no template


@needs_shared
def test_real_adversarial_qa_keeps_passages_apart_and_drops_few(tmp_path: Path) -> None:
    report, parts = prepared(tmp_path, "data=local", f"data.path={ADVERSARIAL_QA}")
    assert_no_passage_on_both_sides(parts)
    assert contamination_share(report) <= 0.05
    assert report["kept"] == 200 and report["split"]["groups"] < 60


# --- the T0 example ---------------------------------------------------------------


@pytest.mark.skipif(len(T0_FILES) < 4, reason="the shared T0 files are not present")
def test_t0_experiment_prepares_the_four_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # its paths are relative to the repo root
    report, _ = prepared(tmp_path, "+experiment=t0")
    assert set(report["sources"]) == {"adversarial_qa", "ag_news", "amazon_polarity", "gigaword"}
    assert all(v == {"loaded": 200, "used": 200} for v in report["sources"].values())
    assert set(report["per_task"]["test"]) == set(report["sources"])
    assert contamination_share(report) <= 0.05


def test_t0_experiment_without_the_shared_files_names_the_missing_path(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared here
    cfg = from_mapping(compose(["+experiment=t0"]))
    with pytest.raises(ConfigError) as info:
        prepare.run(cfg, prepare.Paths(tmp_path / "out", tmp_path / "stats.json"))
    first = info.value.problems[0]
    assert first == (f"data.sources[0].path: ../shared/data/self-instruct/t0/"
                     f"adversarial_qa_dbidaf_answer_the_following_q.jsonl not found (relative to {tmp_path})")
    assert len(info.value.problems) == 4 and not (tmp_path / "out").exists()


def test_the_app_names_missing_data_files_before_any_stage_runs(tmp_path: Path) -> None:
    """`python -m pipeline +experiment=t0` where ../shared is absent: one error line, no model built."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "+experiment=t0", f"hydra.run.dir={tmp_path / 'job'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "data.sources[0].path: ../shared/data/self-instruct/t0/" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "cache").exists()  # base_model never started


# --- config -----------------------------------------------------------------------


@pytest.mark.parametrize("override, problem", [
    ("data.group_by=passage", "data.group_by: 'passage' is not one of auto, none"),
    ("data.group_by='re:(unclosed'", "data.group_by: 're:(unclosed' is not a valid regex"),
    ("data.group_by=meta.", "data.group_by: 'meta.' is not one of"),
    ("data.dedup.template_df=0", "data.dedup.template_df: must be in (0, 1]"),
    ("data.dedup.template_df=1.5", "data.dedup.template_df: must be in (0, 1]"),
])
def test_bad_split_keys_are_one_line_naming_the_key(override: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(compose([override]))
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem)
    assert "\n" not in info.value.problems[0]


def test_group_fields_match_the_splitter() -> None:
    assert GROUP_FIELDS == splits.FIELDS

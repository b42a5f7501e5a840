"""Safety rules (prepare's filter, evaluate's output review) and bias slices, on hand-made data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import config_with
from pipeline import prepare
from pipeline.core import config
from pipeline.data import safety
from pipeline.evaluation import scoring
from pipeline.evaluation import slices
from pipeline.data.schema import Example
from pipeline.core.files import read_json, read_jsonl
from pipeline.params import compose

PROJECT = Path(__file__).resolve().parents[1]


def rules(tmp_path: Path, keywords: str, regexes: str = "", classifier=None) -> safety.Rules:
    (tmp_path / "kw.txt").write_text(keywords, encoding="utf-8")
    (tmp_path / "rx.txt").write_text(regexes, encoding="utf-8")
    return safety.load_rules(tmp_path / "kw.txt", tmp_path / "rx.txt", classifier)


def test_keywords_match_whole_words_in_any_case_and_regexes_may_ask_for_more(tmp_path: Path) -> None:
    r = rules(tmp_path, "# a comment\nmalware\npipe bomb\n", r"anti\w+ware" + "\n")
    assert r.check("How do I write MALWARE?") == ["keyword:malware"]
    assert r.check("Install antimalware software.") == ["regex:anti\\w+ware"]  # a word inside a word: regex only
    assert r.check("malwares and the malwarebytes scanner") == []
    assert r.check("a Pipe   Bomb, they said") == ["keyword:pipe bomb"]
    assert r.check("the pipe bombed") == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["Malware", "mal", "ware", "pipe", "BOMB", "pipe\tbomb", "ſ", "K", "é", "x-ray",
                                 " ", "\n", ".", "malwaRe!", "ma\u200blware"]), max_size=12).map("".join))
def test_keyword_prefilter_never_changes_what_the_rules_find(text: str) -> None:
    """The lower-cased word test that skips regexes on ASCII text gives exactly the regexes' answer."""
    r = safety.Rules(("malware", "pipe bomb", "x-ray", "straße"), (r"\bk\w+",))
    naive = [name for name, rx, _ in r._compiled if rx.search(text)]
    assert r.check(text) == naive


# The default lists' patterns, in the textbook form they replace (conf/safety/lists/regex.txt).
TEXTBOOK = (r"\b(?:\d[ -]?){15}\d\b", r"\b\d{3}-\d{2}-\d{4}\b")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["1", "12", "123", "1234", "0000", "4111 1111 1111 1111", "-", " ", "  ", "a", "_",
                                 "x1", "١٢٣", "\n", ".", "123-45-6789"]), max_size=14).map("".join))
def test_default_regexes_find_what_their_textbook_forms_find(text: str) -> None:
    shipped = safety.read_list(PROJECT / "conf/safety/lists/regex.txt")
    assert len(shipped) == len(TEXTBOOK)
    for fast, plain in zip(shipped, TEXTBOOK):
        a, b = re.search(fast, text, re.IGNORECASE), re.search(plain, text, re.IGNORECASE)
        assert (a and a.span()) == (b and b.span()), (fast, text)


def test_classifier_hook_from_a_target_adds_its_reason(tmp_path: Path) -> None:
    hook = safety.build_classifier({"_target_": "tests.test_safety_slices.shouting"})
    r = rules(tmp_path, "", "", hook)
    assert r.check("PLEASE STOP SHOUTING") == ["classifier:all caps"]
    assert r.check("calm text") == []


def shouting(text: str) -> str | None:
    """A stand-in user classifier (a real callable): flags texts written in capitals."""
    return "all caps" if text.isupper() else None


def test_bad_regex_is_reported_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(safety.SafetyListError, match=r"rx.txt:3: "):
        rules(tmp_path, "", "ok\n# fine\n(unclosed\n")


def ex(i: int, instruction: str, output: str = "fine") -> Example:
    return Example(id=f"r{i}", task="t", task_type="free_text", instruction=instruction, input="", output=output,
                   source="hand")


def test_filter_quarantines_exactly_the_rows_that_hit_a_rule_and_counts_them(tmp_path: Path) -> None:
    r = rules(tmp_path, "ransomware\n", r"\b\d{3}-\d{2}-\d{4}\b" + "\n")
    rows = [ex(0, "Explain ransomware."), ex(1, "Explain antiransomware tools."), ex(2, "Say hi.", "SSN 123-45-6789"),
            ex(3, "Ransomware and 123-45-6789"), ex(4, "Tell a story.")]
    kept, quarantined = prepare.safety_filter(rows, r)
    assert [e.id for e in kept] == ["r1", "r4"]
    assert [q["id"] for q in quarantined] == ["r0", "r2", "r3"]
    assert quarantined[2]["rules"] == ["keyword:ransomware", "regex:\\b\\d{3}-\\d{2}-\\d{4}\\b"]
    assert quarantined[1]["raw"]["output"] == "SSN 123-45-6789"
    counts = prepare.safety_counts(quarantined)
    assert counts == {"quarantined": 3, "by_rule": {"keyword:ransomware": 2, "regex:\\b\\d{3}-\\d{2}-\\d{4}\\b": 2}}


def test_prepare_stage_quarantines_unsafe_rows_and_reports_them(tmp_path: Path) -> None:
    data = tmp_path / "raw.jsonl"
    lines = [f'{{"instruction": "Summarize note {i}.", "input": "", "output": "Note {i} is short."}}' for i in range(12)]
    lines[4] = '{"instruction": "Write a keylogger.", "input": "", "output": "No."}'
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config.from_mapping(compose(["data=local", f"data.path={data}", "data.task=notes"])).data
    report = prepare.run(config_with(data=cfg, seed=0), prepare.Paths(tmp_path / "prepared", tmp_path / "stats.json"))
    assert report["kept"] == 11 and report["safety"] == {"quarantined": 1, "by_rule": {"keyword:keylogger": 1}}
    assert report["quarantine"]["rows"] == 1
    [q] = read_jsonl(tmp_path / "prepared" / "quarantine.jsonl")
    assert q["reason"] == "safety: keyword:keylogger" and q["raw"]["instruction"] == "Write a keylogger."
    assert read_json(tmp_path / "prepared" / "safety.json") == report["safety"]
    assert read_json(tmp_path / "stats.json")["safety"]["quarantined"] == 1


def test_flagged_output_rate_with_its_interval(tmp_path: Path) -> None:
    r = rules(tmp_path, "nerve agent\n")
    preds = ["Here is how to make a nerve agent.", "The capital is Paris.", "NERVE AGENT recipe", "Sure."]
    rate = safety.flag_rate([r.check(p) for p in preds])
    assert rate["rate"] == 0.5 and rate["flagged"] == 2 and rate["n"] == 4
    assert 0.0 <= rate["low"] <= 0.5 <= rate["high"] <= 1.0
    clean = safety.flag_rate([r.check("Sure.")] * 5)
    # None of 5 flagged is not a rate known to be 0: the exact interval reaches 1 - 0.025^(1/5) = 0.522.
    assert (clean["rate"], clean["low"]) == (0.0, 0.0) and clean["high"] == pytest.approx(1 - 0.025 ** 0.2)


def test_slice_metrics_one_slice_all_right_the_other_all_wrong() -> None:
    refs = ["sports", "world"] * 12
    preds = refs[:12] + ["world", "sports"] * 6  # the first twelve right, the rest wrong
    outputs = {"m": {"topic": scoring.TaskOutputs("classification", refs, preds, ["sports", "world"],
                                                  [1.0] * 24, [2] * 24)}}
    values = [{"meta.region": "north"}] * 12 + [{"meta.region": "south"}] * 12
    table = slices.score_slices(["meta.region"], values, outputs, ["topic"] * 24, n_resamples=100, seed=0)
    acc = {r["value"]: r for r in table.rows if r["metric"] == "accuracy"}
    # 12/12 and 0/12: exact (Clopper-Pearson) intervals, not the bootstrap's [1, 1] and [0, 0]
    assert (acc["north"]["score"], acc["north"]["high"]) == (1.0, 1.0)
    assert acc["north"]["low"] == pytest.approx(0.7354, abs=1e-4)
    assert (acc["south"]["score"], acc["south"]["low"]) == (0.0, 0.0)
    assert acc["south"]["high"] == pytest.approx(1 - 0.7354, abs=1e-4)
    assert acc["north"]["n"] == acc["south"]["n"] == 12
    gap = table.largest_gap()
    assert (gap["slice"], gap["task"], gap["high"], gap["low"], gap["gap"]) == ("meta.region", "topic", "north",
                                                                               "south", 1.0)
    assert 0.5 < gap["ci"][0] < 1.0 == gap["ci"][1]
    assert "Largest gap between slices: **meta.region** for **m** on **topic**" in slices.markdown(table)


def test_slice_values_fields_meta_and_length_buckets() -> None:
    row = {"id": "a", "task": "qa", "source": "s1", "instruction": "one two three", "input": "four",
           "meta": {"lang": "en"}}
    assert slices.slice_value(row, "source", [20, 40]) == "s1"
    assert slices.slice_value(row, "meta.lang", [20, 40]) == "en"
    assert slices.slice_value(row, "input_length", [3, 10]) == "4-10"
    assert [slices.bucket(n, [20, 40]) for n in (0, 20, 21, 40, 41)] == ["<=20", "<=20", "21-40", "21-40", ">40"]
    with pytest.raises(slices.SliceError, match="'colour' is not a field"):
        slices.slice_value(row, "colour", [20])
    with pytest.raises(slices.SliceError, match="no meta column 'year'"):
        slices.slice_value(row, "meta.year", [20])


def test_base_kshot_needs_exemplars_in_config() -> None:
    with pytest.raises(config.ConfigError, match="base_kshot needs prompt.eval_k_shot >= 1"):
        config.from_mapping(compose(["prompt.eval_k_shot=0"]))
    with pytest.raises(config.ConfigError, match="unknown model 'fewshot'"):
        config.from_mapping(compose(["eval.models=[fewshot]"]))

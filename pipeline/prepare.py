"""Stage 2, prepare: load raw data (one source or a mixture), validate, deduplicate, split, report.

Reads ``data``, ``safety`` and ``seed``. Writes ``train/val/test.jsonl`` (one
normalized :class:`~pipeline.data.schema.Example` per line) to ``--out``, a stats report
to ``--stats`` and a length histogram to ``--plot``. Every removed or flagged row is
counted with its reason. Invalid raw data stops the stage with every problem listed as
file:line: field and nothing written (``data.on_error: fail``), or goes to
``quarantine.jsonl`` and is counted (``skip``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from pipeline.core import cli, config, parallel
from pipeline.data import safety
from pipeline.data import dedup, mixture
# split is re-exported: benchmarks and tests call prepare.split
from pipeline.data.splits import MIN_GROUPS, SPLITS, plan, split  # noqa: F401
from pipeline.data.schema import Example, Problem, ProblemCollector
from pipeline.core.files import atomic_dir, write_json, write_jsonl
from pipeline.core.errors import ConfigError, SplitError
from pipeline.core.paths import search_roots

# The reasons data.dedup checks give; each is always in the stats, found or not.
CHECKS = ("exact_duplicate", "near_duplicate", "contamination_exact", "contamination_ngram")


def load_source(cfg: config.DataConfig, problems: ProblemCollector, name: str | None = None) -> list[Example]:
    """Raw examples from one configured source, normalized and validated."""
    if cfg.source == "embedded":
        from pipeline.data import embedded

        rows = embedded.generate(cfg.generator_seed, cfg.n_per_task)
        return [dataclasses.replace(e, source=name) for e in rows] if name else rows
    from pipeline.data import formats

    common = dict(format=cfg.format, task=cfg.task, task_type=cfg.task_type, columns=dict(cfg.columns),
                  max_problems=cfg.max_problems, source=name, problems=problems)
    if cfg.source == "local":
        return formats.load_file(cfg.path, **common)  # type: ignore[arg-type]
    return formats.load_hub(cfg.path, split=cfg.hub_split, config=cfg.hub_config,  # type: ignore[arg-type]
                            revision=cfg.hub_revision, **common)


def load(cfg: config.DataConfig, seed: int, problems: ProblemCollector) -> tuple[list[Example], dict[str, Any]]:
    """Every configured source, mixed; return the rows and per-source counts."""
    if cfg.source != "mixture":
        rows = load_source(cfg, problems)
        return rows, {name: {"loaded": n, "used": n} for name, n in Counter(e.source for e in rows).items()}
    parts = []
    for src in cfg.sources:
        # Ids are prefixed with the source name: two files may both have a row "1".
        rows = [dataclasses.replace(e, id=f"{src.name}/{e.id}")
                for e in load_source(cfg.resolve(src), problems, src.name)]
        parts.append(mixture.Part(src.name, rows, src.weight, src.cap))
    return mixture.mix(parts, seed)


def apply(action: str, rows: list[Example], flags: list[dict[str, Any]],
          dropped: list[dict[str, Any]], flagged: list[dict[str, Any]]) -> list[Example]:
    """Remove the flagged rows (``remove``) or only record them (``report``)."""
    if action == "remove":
        dropped += flags
        gone = {f["id"] for f in flags}
        return [e for e in rows if e.id not in gone]
    flagged += flags
    return rows


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    p = np.percentile(values, [50, 90, 99, 100])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "max": float(p[3])}


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(d["reason"] for d in rows).items()))


def quarantine_rows(problems: list[Problem]) -> list[dict[str, Any]]:
    """One record per problem, with the raw row it was found in."""
    return [{"file": p.file, "line": p.line, "field": p.field, "reason": p.message, "raw": p.raw} for p in problems]


def stats(loaded: int, splits: dict[str, list[Example]], dropped: list[dict[str, Any]],
          flagged: list[dict[str, Any]] = (), quarantined: list[dict[str, Any]] = (),  # type: ignore[assignment]
          sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts per source, task and split; removed and reported rows by reason; quarantine; lengths in words."""
    every = [e for rows in splits.values() for e in rows]
    removed, kept_flagged = _counts(dropped), _counts(flagged)
    return {
        "loaded": loaded,
        "kept": len(every),
        "dropped": removed,
        "flagged": kept_flagged,  # found by a check set to `report`, kept
        "dedup": {reason: {"found": removed.get(reason, 0) + kept_flagged.get(reason, 0),
                           "removed": removed.get(reason, 0)} for reason in CHECKS},
        "quarantine": {"rows": len({(q["file"], q["line"], q.get("id")) for q in quarantined}), "problems": len(quarantined)},
        "splits": {s: len(rows) for s, rows in splits.items()},
        "sources": sources or {},
        "per_source": {s: dict(sorted(Counter(e.source for e in rows).items())) for s, rows in splits.items()},
        "per_task": {s: dict(sorted(Counter(e.task for e in rows).items())) for s, rows in splits.items()},
        "task_types": dict(sorted({e.task: e.task_type for e in every}.items())),
        "length_words": {
            "prompt": _percentiles([len(dedup.prompt_text(e).split()) for e in every]),
            "output": _percentiles([len(e.output.split()) for e in every]),
        },
    }


def safety_filter(rows: list[Example], rules: Any) -> tuple[list[Example], list[dict[str, Any]]]:
    """Split off the examples any safety rule hits, as quarantine records naming the rules.

    Every turn of a conversation is checked, prompt and answer alike: a harmful answer
    is what fine-tuning would teach.
    """
    return _quarantine(rows, parallel.joined(start_safety(rows, rules)))


def start_safety(rows: list[Example], rules: Any) -> Generator[list[list[str]], None, None]:
    """The rules each row hits, started now (:func:`pipeline.core.parallel.start_rows`): large inputs
    are checked in forked workers while this process goes on, unless a classifier hook is set
    (a model may hold threads or a GPU context that must not fork)."""
    return parallel.start_rows(_safety_hits, (rows, rules), len(rows), parallel=rules.classifier is None)


def _quarantine(rows: list[Example], hits: list[list[str]]) -> tuple[list[Example], list[dict[str, Any]]]:
    """The rows no rule hit, and a quarantine record for each other row."""
    kept, quarantined = [], []
    for e, found in zip(rows, hits):
        if found:
            quarantined.append({"file": e.source or "data", "line": None, "field": "safety", "id": e.id,
                                "reason": "safety: " + ", ".join(found), "rules": found, "raw": e.to_dict()})
        else:
            kept.append(e)
    return kept, quarantined


def _safety_hits(state: tuple[list[Example], Any], task: tuple[int, int]) -> list[list[str]]:
    rows, rules = state
    return [rules.check(dedup.full_text(e) if e.messages is None else "\n".join(m["content"] for m in e.messages))
            for e in rows[task[0]:task[1]]]


def safety_counts(quarantined: list[dict[str, Any]]) -> dict[str, Any]:
    """Examples the safety filter quarantined, in all and per rule (an example may hit several)."""
    return {"quarantined": len(quarantined),
            "by_rule": dict(sorted(Counter(r for q in quarantined for r in q["rules"]).items()))}


@dataclass(frozen=True)
class Paths:
    out: Path = cli.field("directory for train/val/test.jsonl")
    stats: Path = cli.field("stats JSON to write")
    plot: Path | None = cli.field("PNG histogram of example lengths in words", default=None)


@parallel.paused_gc()  # row work: no reference cycles to collect (see paused_gc)
def run(cfg: config.PipelineConfig, paths: Paths) -> dict[str, Any]:
    """Prepare the dataset into ``paths.out`` (atomically), write the stats report and the length plot.

    ``out`` holds ``train/val/test.jsonl``, ``dropped.jsonl`` (rows removed, with why),
    ``flagged.jsonl`` (rows a check set to ``report`` found, kept) and ``quarantine.jsonl``
    (invalid raw rows, with ``data.on_error: skip``, and every example a ``safety`` rule
    hits, whatever ``on_error`` says, with the rules it hit); ``safety.json`` counts the
    latter per rule.
    """
    missing = cfg.data.missing_files(Path.cwd())
    if missing:  # before anything is read or built
        raise ConfigError(missing, "the data config")
    rules = safety.from_config(cfg.safety, search_roots())
    problems = ProblemCollector(limit=cfg.data.max_problems, skip=cfg.data.on_error == "skip")
    examples, sources = load(cfg.data, cfg.seed, problems)
    problems.raise_if_any()
    dropped: list[dict[str, Any]] = []
    flagged: list[dict[str, Any]] = []
    kept, unsafe = deduplicate(examples, rules, cfg.data.dedup, dropped, flagged)
    dd = cfg.data.dedup
    made = plan(kept, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed, cfg.data.group_by, dd.template_df)
    splits = made.splits
    if not splits["train"] or not splits["test"]:
        raise SplitError(
            f"{len(kept)} examples make {made.stats['groups']} groups (data.group_by={cfg.data.group_by}), too few "
            f"for a test set (at least {MIN_GROUPS}, none too large for its share); add examples, or group by less")
    if dd.contamination != "off":  # removed from train: val/test stay the fixed yardstick
        found = dedup.contamination(splits["train"], splits["val"] + splits["test"], dd.ngram, dd.ngram_threshold,
                                    dd.template_df)
        splits["train"] = apply(dd.contamination, splits["train"], found, dropped, flagged)
    quarantined = quarantine_rows(problems.problems) + unsafe
    report = {**stats(len(examples), splits, dropped, flagged, quarantined, sources), "split": made.stats,
              "safety": safety_counts(unsafe)}
    _write(paths, splits, dropped, flagged, quarantined, report)
    return report


def deduplicate(examples: list[Example], rules: Any, cfg: config.DedupConfig, dropped: list[dict[str, Any]],
                flagged: list[dict[str, Any]]) -> tuple[list[Example], list[dict[str, Any]]]:
    """The examples no safety rule hits, without exact and near duplicates (per ``cfg``); and the
    quarantine records of the unsafe ones. Removed and reported rows are appended to ``dropped``/``flagged``."""
    check = start_safety(examples, rules)
    try:  # exact-duplicate keys are computed here while forked workers check the safety rules
        keys = [dedup.exact_key(e) for e in examples] if cfg.exact != "off" else None
        hits = parallel.joined(check)
    finally:
        check.close()  # ends the workers if the keys failed; nothing left to do otherwise
    kept, unsafe = _quarantine(examples, hits)
    if keys is not None:
        kept_keys = [key for key, found in zip(keys, hits) if not found]
        kept = apply(cfg.exact, kept, dedup.exact_duplicates(kept, kept_keys), dropped, flagged)
    if cfg.near != "off":
        found = dedup.near_duplicates(kept, cfg.near_threshold, cfg.shingle, cfg.num_perm)
        kept = apply(cfg.near, kept, found, dropped, flagged)
    return kept, unsafe


def _write(paths: Paths, splits: dict[str, list[Example]], dropped: list[dict[str, Any]],
           flagged: list[dict[str, Any]], quarantined: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """The splits and the records of every removed row (atomically), the stats and the length plot."""
    with atomic_dir(paths.out) as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", (e.to_dict() for e in rows))
        write_jsonl(tmp / "dropped.jsonl", dropped)
        write_jsonl(tmp / "flagged.jsonl", flagged)
        write_jsonl(tmp / "quarantine.jsonl", quarantined)
        write_json(tmp / "safety.json", report["safety"])
    write_json(paths.stats, report)
    if paths.plot is not None:
        from pipeline.core.plots import length_histograms

        length_histograms({s: [len(dedup.full_text(e).split()) for e in rows] for s, rows in splits.items()},
                          "words per example (prompt + answer)", paths.plot)


def main(argv: Sequence[str] | None = None) -> int:
    params, paths = cli.parse(__doc__, Paths, argv)
    report = run(config.load(params), paths)
    print(f"prepare: {report['kept']} examples ({report['splits']}), dropped {report['dropped'] or 'none'}, "
          f"flagged {report['flagged'] or 'none'}, quarantined {report['quarantine']['rows']} rows "
          f"({report['safety']['quarantined']} by the safety filter: {report['safety']['by_rule'] or 'no rule hit'})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard("prepare", main))

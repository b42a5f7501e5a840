"""Safety rules over text: keyword and regex lists plus an optional classifier.

One :class:`Rules` object serves both ends of the pipeline: prepare quarantines training
examples it matches, evaluate flags model outputs it matches. Keywords match whole words
only (``ransomware`` does not match ``antiransomware``); a user who wants substrings
writes a regex. Each match is reported by the rule that fired, never silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


from pipeline.core.errors import SafetyListError

Classifier = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Rules:
    """Compiled rules; ``check(text)`` returns the names of the rules a text hits."""

    keywords: tuple[str, ...]
    patterns: tuple[str, ...]
    classifier: Classifier | None = None

    def __post_init__(self) -> None:
        # Lookarounds rather than \b so a keyword that starts or ends with punctuation still
        # matches only as a whole word; whitespace inside a phrase matches any whitespace.
        # Each keyword rule carries the words an ASCII text must contain (lower-cased) for
        # it to match: a cheap exact test that skips the regex on most texts.
        compiled = [(f"keyword:{k}", re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, k.split())) + r"(?!\w)",
                                                re.IGNORECASE), tuple(k.lower().split()) if k.isascii() else ())
                    for k in self.keywords]
        compiled += [(f"regex:{p}", re.compile(p, re.IGNORECASE), ()) for p in self.patterns]
        object.__setattr__(self, "_compiled", compiled)
        # One scan of a lower-cased ASCII text for the first word of every ASCII keyword: when
        # none is in it, no such keyword rule can match and only the other rules are run.
        firsts = sorted({words[0] for _, _, words in compiled if words})
        object.__setattr__(self, "_gate", re.compile("|".join(map(re.escape, firsts))) if firsts else None)
        object.__setattr__(self, "_ungated", [rule for rule in compiled if not rule[2]])

    def check(self, text: str) -> list[str]:
        """Every rule ``text`` hits, in list order (keywords, regexes, then the classifier)."""
        # For ASCII text and an ASCII keyword, IGNORECASE matching is matching the lower-cased
        # text, so a keyword word missing from it means no match; other texts run every regex.
        lower = text.lower() if text.isascii() else None
        rules = self._compiled  # type: ignore[attr-defined]
        if lower is not None and self._gate is not None and self._gate.search(lower) is None:  # type: ignore[attr-defined]
            rules = self._ungated  # type: ignore[attr-defined]
        hits = [name for name, rx, words in rules if (lower is None or all(w in lower for w in words)) and rx.search(text)]
        if self.classifier is not None:
            reason = self.classifier(text)
            if reason:
                hits.append(f"classifier:{reason}")
        return hits


def read_list(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a rule list."""
    if not path.is_file():
        raise SafetyListError(f"safety: rule list {path} does not exist")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_rules(keywords_file: Path, regex_file: Path, classifier: Classifier | None = None) -> Rules:
    """Read both lists; every regex that does not compile is reported, with its file and line."""
    patterns = read_list(regex_file)
    bad = []
    for line_no, line in enumerate(regex_file.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            try:
                re.compile(line.strip())
            except re.error as err:
                bad.append(f"{regex_file}:{line_no}: {err}")
    if bad:
        raise SafetyListError("safety: bad regex(es):\n  " + "\n  ".join(bad))
    return Rules(tuple(read_list(keywords_file)), tuple(patterns), classifier)


def build_classifier(spec: dict[str, Any] | None) -> Classifier | None:
    """The ``safety.classifier`` hook: ``{_target_: module.fn}``, or a factory with arguments.

    Any importable callable may be named, and importing runs its module: the config is
    trusted like code (RELIABILITY.md). A target that cannot be imported or built, or is not
    callable, is a config error naming the key.
    """
    if not spec:
        return None
    from hydra.errors import HydraException
    from hydra.utils import get_method, instantiate

    from pipeline.core.errors import ConfigError

    target = spec.get("_target_")
    try:
        built = instantiate(spec) if len(spec) > 1 else get_method(target)
    except (HydraException, ImportError, AttributeError, TypeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError([f"safety.classifier: cannot build {target!r}: {reason}"]) from None
    if not callable(built):
        raise ConfigError([f"safety.classifier: {target!r} gave a {type(built).__name__}, not a callable text -> reason"])
    return built


def from_config(cfg: Any, roots: Sequence[Path]) -> Rules:
    """Rules from ``safety`` config (a :class:`pipeline.core.config.SafetyConfig`).

    A relative list path is looked up under each of ``roots`` in turn (the working
    directory, then the project checkout that ships the default lists).
    """
    def find(name: str) -> Path:
        return next((r / name for r in roots if (r / name).is_file()), roots[0] / name)

    return load_rules(find(cfg.keywords_file), find(cfg.regex_file), build_classifier(cfg.classifier))


def flag_rate(flags: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Share of outputs with at least one flag, its exact 95% (Clopper-Pearson) interval, and the count:
    0 of 96 flagged is a rate below 0.038, not a rate known to be 0."""
    from pipeline.evaluation.resampling import exact_interval  # scipy: only evaluate needs it, not prepare

    flagged, n = sum(1 for f in flags if f), len(flags)
    low, high = exact_interval(flagged, n)
    return {"rate": flagged / n if n else 0.0, "low": low, "high": high, "flagged": flagged, "n": n}

"""Tokenizing many texts fast, and exactly as the tokenizer would: the fast path of render.

:func:`reference_encode` is the plain definition, the tokenizer's own call. :func:`encode`
tokenizes each distinct text once through the Rust backend; :class:`PieceEncoder` goes
further and tokenizes each distinct *piece* (the text between special tokens, cut into the
pre-tokenizer's words) once, across calls. Both return exactly what the reference returns
(``tests/test_render_pieces.py`` compares them on every text render tokenizes, and on
awkward ones); a tokenizer for which cutting is not exact is detected and gets :func:`encode`.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Any, Callable


def reference_encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of ``texts``: the tokenizer's own batched call, the definition the fast paths keep
    (a tokenizer loaded with ``tokenizers`` alone is called through its backend, as transformers does)."""
    if not texts:
        return []
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=special)]


def encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of ``texts``, as :func:`reference_encode` gives them, faster.

    Each distinct text is tokenized once (answers such as a class label repeat thousands
    of times), and a fast tokenizer's Rust backend is called directly: the Python
    wrapper around it costs as much as the tokenization itself on short texts.
    """
    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    if getattr(tokenizer, "is_fast", False):
        encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(unique, add_special_tokens=special)]
    else:
        encoded = tokenizer(unique, add_special_tokens=special)["input_ids"]
    ids = dict(zip(unique, encoded))
    return [ids[t] for t in texts]


class PieceEncoder:
    """:func:`encode`, but tokenizing each distinct *piece* of text once, across calls.

    A fast tokenizer splits out its added (special) tokens before anything else, so the
    text between them is tokenized on its own: cutting there and concatenating the ids
    is exact. The chat template's system prompt, role headers and a task's instruction
    repeat in every example, and k-shot exemplars repeat train rows, so most pieces
    are cache hits. With GPT-2's byte-level pre-tokenizer, text of plain ASCII is cut
    into that pre-tokenizer's own words (BPE never merges across them), so a new example
    costs dictionary lookups for the words it shares with earlier ones; other text is cut
    before a newline that follows a non-space, where no pre-token spans either.

    Two levels, two caches: a text is cut at its special tokens (a fast literal search),
    each *segment* between them is looked up whole (a k-shot exemplar's turn is the same
    segment in every prompt it is shown in), and only a new segment is cut into pieces
    (words, or lines), each looked up in turn.

    Tokenizers where that does not hold (a normalizer, a prefix space per piece,
    added tokens that strip whitespace, a slow tokenizer) are detected from their
    settings and get :func:`encode`; the first batch is also checked against it, and a
    single difference turns piece encoding off (``self.pieces`` says which path runs).
    """

    def __init__(self, tokenizer: Any, sample: int = 64):
        self.tokenizer = tokenizer
        self.sample = sample
        self.checked: set[bool] = set()  # the `special` values checked against `encode`
        self.cache: dict[str, list[int]] = {}  # piece -> ids
        self.segment_cache: dict[str, list[int]] = {}  # text between special tokens (or one) -> ids
        cutters = _piece_splitter(tokenizer)
        self.segment, self.cut = cutters or (None, None)
        self.pieces = cutters is not None
        if self.pieces:  # what add_special_tokens=True puts around a text (e.g. BOS)
            backend = tokenizer.backend_tokenizer
            bare, full = (backend.encode("a", add_special_tokens=s).ids for s in (False, True))
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
            self.affixes = (full[:at], full[at + len(bare):]) if at is not None else None
            self.pieces = at is not None

    def splitter(self, text: str) -> list[str]:
        """The pieces ``text`` is tokenized in (both levels of cuts)."""
        return [piece for segment in self.segment(text) for piece in self.cut(segment)]

    def __call__(self, texts: list[str], special: bool) -> list[list[int]]:
        if not self.pieces:
            return encode(self.tokenizer, texts, special)
        if special not in self.checked:
            self.checked.add(special)
            head = list(dict.fromkeys(texts))[:self.sample]
            if self._encode(head, special) != encode(self.tokenizer, head, special):
                self.pieces = False
                return encode(self.tokenizer, texts, special)
        return self._encode(texts, special)

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        parts = [self.segment(t) for t in texts]
        new = list(dict.fromkeys(p for ps in parts for p in ps if p not in self.segment_cache))
        if new:
            cuts = [self.cut(segment) for segment in new]
            fresh = list(dict.fromkeys(p for ps in cuts for p in ps if p not in self.cache))
            if fresh:
                batch = self.tokenizer.backend_tokenizer.encode_batch(fresh, add_special_tokens=False)
                self.cache.update(zip(fresh, (e.ids for e in batch)))
            piece = self.cache.__getitem__
            self.segment_cache.update(zip(new, (list(chain.from_iterable(map(piece, ps))) for ps in cuts)))
        segment = self.segment_cache.__getitem__
        out = [list(chain.from_iterable(map(segment, ps))) for ps in parts]
        prefix, suffix = self.affixes if special else ([], [])
        return [prefix + ids + suffix for ids in out] if prefix or suffix else out


# GPT-2's byte-level pre-tokenizer regex (tokenizers' ByteLevel, use_regex), with \p{L} and
# \p{N} written out for ASCII: on text of printable ASCII, tab, newline and carriage return
# it cuts exactly where the tokenizer does (not on \x1c, which Python's \s takes and the
# tokenizer's does not: such text is cut at newlines), and BPE never merges across those
# cuts, so each word is tokenized once and looked up after.
_ASCII_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_OUTSIDE_PLAIN = re.compile(r"[^\t\n\r\x20-\x7e]")  # any other character: cut at newlines only


def _piece_splitter(tokenizer: Any) -> tuple[Callable[[str], list[str]], Callable[[str], list[str]]] | None:
    """How to cut a text into pieces that tokenize independently, or None where cutting is not exact:
    at (and around) its added tokens, then each segment between them into its words (plain
    ASCII) or before its newlines."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    if backend.normalizer is not None or backend.truncation or backend.padding:
        return None
    if pre is not None and not (type(pre).__name__ == "ByteLevel" and not pre.add_prefix_space):
        return None  # e.g. Metaspace: each piece would get its own prefix space
    added = list(backend.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    contents = {t.content for t in added}
    # Longest first: Python's alternation takes the first that matches, the tokenizer the longest.
    at_specials = re.compile("(" + "|".join(re.escape(t.content) for t in sorted(added, key=lambda t: -len(t.content)))
                             + ")")  # literals only: a fast search; the group keeps the tokens
    # Not at a segment's start: the text before it ends with a special token, a cut already.
    at_newlines = re.compile(r"(?=\n)(?<=\S)") if pre is not None and pre.use_regex else None

    def segment(text: str) -> list[str]:
        return [p for p in at_specials.split(text) if p]

    def cut(text: str) -> list[str]:
        if at_newlines is None or text in contents:  # an added token is one piece
            return [text]
        if _OUTSIDE_PLAIN.search(text) is None:  # plain ASCII: the pre-tokenizer's own words
            return _ASCII_WORDS.findall(text)
        return [p for p in at_newlines.split(text) if p]

    return segment, cut

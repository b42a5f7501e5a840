"""The render stage's shortcuts give exactly what the plain computation gives.

Piece-wise tokenization (:class:`pipeline.pieces.PieceEncoder`) against the tokenizer's
own encoding of each whole text, over every text the embedded default renders (k-shot arm
included); chat templates rendered from a per-role skeleton against Jinja per example; the
k-shot draw against the filter-every-row definition.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline import prepare, render
from pipeline.core import parallel
from pipeline.core.files import jsonl_bytes, read_jsonl, write_jsonl
from pipeline.core.models import load_tokenizer
from pipeline.prompting.chat_skeletons import transparent as _transparent
from pipeline.prompting.jinja import compile_template as _compile
from pipeline.prompting.templates import conversation, make_template, segments
from pipeline.prompting.shots import ShotPool
from pipeline.prompting import pieces
from pipeline.prompting.rows import _append

@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, smoke_cfg) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("pieces")
    data = dataclasses.replace(smoke_cfg.data, n_per_task=250)  # the embedded default's tasks, 1000 examples
    prepare.run(dataclasses.replace(smoke_cfg, data=data), prepare.Paths(out / "prepared", out / "stats.json"))
    return {split: read_jsonl(out / "prepared" / f"{split}.jsonl") for split in render.SPLITS}


def all_texts(prepared, template) -> list[str]:
    """Every piece render tokenizes: each split, and the test split with 3 train exemplars."""
    pool = ShotPool(prepared["train"])
    pieces = [segments(ex, template) for rows in prepared.values() for ex in rows]
    pieces += [segments(ex, template, pool.draw(ex, 3, 0)) for ex in prepared["test"]]
    return [text for parts in pieces for text, _ in parts]


def test_piece_encoding_equals_whole_text_encoding_on_every_rendered_text(tokenizer, smoke_cfg, prepared) -> None:
    template = make_template(smoke_cfg.prompt, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    texts = all_texts(prepared, template)
    assert len(texts) > 1500 and any(t.count("<|im_start|>") > 4 for t in texts)  # k-shot texts are in
    encoder = pieces.PieceEncoder(tokenizer)
    assert encoder.pieces, "SmolLM2's byte-level BPE is cut into pieces"
    # Plain ASCII is cut into the pre-tokenizer's words; other text before its newlines.
    assert encoder.splitter("<|im_start|>user\nSay hi.\n\nHello  there\n<|im_end|>") == [
        "<|im_start|>", "user", "\n", "Say", " hi", ".", "\n", "\n", "Hello", " ", " there", "\n", "<|im_end|>"]
    assert encoder.splitter("<|im_start|>user\nSay hï.\n\nHello  there\n<|im_end|>") == [
        "<|im_start|>", "user", "\nSay hï.", "\n\nHello  there", "\n", "<|im_end|>"]
    for special in (True, False):
        assert encoder(texts, special) == pieces.encode(tokenizer, texts, special)
        assert encoder(texts, special) == [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
    assert encoder.pieces  # the check on the first batch passed


def test_awkward_texts_tokenize_the_same_in_pieces(tokenizer) -> None:
    texts = ["", "\n", "a\n", "\na", " \n \n", "x \n\ny", "<|im_end|><|im_end|>", "<|im_end|>\n\nword",
             "word<|im_start|>  \n", "tab\t\nnewline", "123\n456", "don't\n's", "naïve café\n日本語\n",
             "emoji 🙂\n🙂", "<|im_start|", "<|endoftext|>x\r\ny"]
    encoder = pieces.PieceEncoder(tokenizer, sample=0)
    assert encoder(texts, True) == [tokenizer(t)["input_ids"] for t in texts]
    assert encoder(texts, False) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


# Words, contractions, digit runs, punctuation runs, whitespace runs of every kind, the
# characters Python and the tokenizer may class differently (\v, \f, \x1c), non-ASCII, and
# special tokens: the word cuts of plain ASCII must give the tokenizer's ids on all of them.
PIECES = st.sampled_from(["a", "Hello", "don", "'", "'s", "'re", "'ll", "'d", "'m", "'t", "'ve", "S", "12", "3",
                          " ", "  ", "\t", "\n", "\r", "\r\n", ".", "...", "!?", "-", "(", ")", "\"", "`", "~",
                          "\v", "\f", "\x1c", "\x00", "é", "日本", "🙂", "\u00a0", "<|im_start|>", "<|im_end|>"])


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.lists(PIECES, max_size=12).map("".join), min_size=1, max_size=6))
def test_word_cuts_give_the_tokenizers_ids(tokenizer, texts: list[str]) -> None:
    encoder = pieces.PieceEncoder(tokenizer, sample=0)  # no first-batch check: the cuts alone are tested
    for special in (True, False):
        assert encoder(texts, special) == [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]


def test_a_tokenizer_with_a_prefix_space_gets_whole_texts() -> None:
    vocab = {"[UNK]": 0, "▁a": 1, "a": 2, "▁b": 3, "<x>": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    slow_path = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=["<x>"])
    encoder = pieces.PieceEncoder(slow_path)
    assert not encoder.pieces  # cut at <x>, "b" would get a prefix space it does not have in "a<x>b"
    texts = ["a <x>a b", "a"]
    assert encoder(texts, False) == [slow_path(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_a_cut_that_changes_the_ids_is_caught_and_whole_texts_are_used(tokenizer) -> None:
    encoder = pieces.PieceEncoder(tokenizer)
    encoder.cut = lambda text: list(text)  # one piece per character: not how BPE sees "Hello"
    texts = ["Hello world", "Hello there"]
    assert encoder(texts, False) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert not encoder.pieces


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize(("source", "transparent"), [
    (CHATML, True),
    ("{{ messages[0]['content'] + '!' }}{% for m in messages[1:] %}{{ m.role ~ m.content }}{% endfor %}"
     "{{ messages|length }}", True),
    ("{% for m in messages %}{{ m.content|trim }}{% endfor %}", False),
    ("{% for m in messages %}{% if m.content %}{{ m.content }}{% endif %}{% endfor %}", False),
    ("{% for m in messages %}{{ m.content.strip() }}{% endfor %}", False),
    ("{{ messages|tojson }}", False),
    ("{% for m in messages %}{{ m }}{% endfor %}", False),
    ("{% for m in messages %}{{ m.name }}{{ m.content }}{% endfor %}", False),
    ("{% for m in messages %}{% set c = m.content %}{{ c }}{% endfor %}", False),
    ("{% for m in messages %}{% set c %}{{ m.content }}{% endset %}{{ c|trim }}{% endfor %}", False),
])
def test_transparent_templates_are_recognized_conservatively(source: str, transparent: bool) -> None:
    assert _transparent(source) is transparent


CONVERSATION = {"id": "c1", "task": "chat", "task_type": "free_text", "instruction": "Hi", "input": "", "output": "Bye",
                "messages": [{"role": "system", "content": "  Be brief.\n"},
                             {"role": "user", "content": "Hi {{ x }} \ue0000\ue001"},
                             {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "\nAnd now?  "},
                             {"role": "assistant", "content": "Bye"}]}


@pytest.mark.parametrize("which", ["tokenizer", "chatml", "trim"])
def test_chat_segments_equal_jinja_per_example(which: str, tokenizer, smoke_cfg, prepared) -> None:
    """The substituted skeleton gives Jinja's text; a template that is not transparent still renders."""
    own = {"tokenizer": None, "chatml": CHATML, "trim": CHATML.replace("message['content']", "message['content']|trim")}
    cfg = smoke_cfg.prompt if own[which] is None else \
        dataclasses.replace(smoke_cfg.prompt, name=which, template=own[which])
    template = make_template(cfg, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    compiled = _compile(template.chat_template)
    pool = ShotPool(prepared["train"])
    cases = [(ex, ()) for ex in prepared["test"][:40]] + [(ex, pool.draw(ex, 2, 1)) for ex in prepared["val"][:20]]
    for ex, shots in cases + [(CONVERSATION, ()), (CONVERSATION, prepared["train"][:1])]:
        messages, _ = conversation(ex, template, shots)
        expected = compiled.render(messages=messages, add_generation_prompt=False,
                                   bos_token=template.bos_token, eos_token=template.eos_token)
        assert "".join(text for text, _ in segments(ex, template, shots)) == expected.rstrip("\n")


def test_k_shot_draw_equals_filtering_every_row(prepared) -> None:
    train = prepared["train"]
    pool = ShotPool(train)

    def reference(example: dict, k: int, seed: int) -> list[dict]:  # the definition, O(train) per draw
        same = [r for r in train if r["task"] == example["task"] and r["id"] != example["id"]]
        rows = same if len(same) >= k else [r for r in train if r["id"] != example["id"]]
        return random.Random(f"{seed}:{example['id']}").sample(rows, min(k, len(rows)))

    odd = {"id": "x", "task": "no-such-task"}  # falls back to every train row
    for ex in train[:30] + prepared["test"][:30] + [odd]:
        for k, seed in ((1, 0), (3, 7), (len(train) + 5, 1)):
            assert pool.draw(ex, k, seed) == reference(ex, k, seed)
            assert all(r["id"] != ex["id"] for r in pool.draw(ex, k, seed))


def test_token_rows_round_trip_through_jsonl_bytes_and_read_jsonl(tmp_path: Path) -> None:
    rows = [{"id": "a\"1", "prompt": "naïve \\ \n 日本 🙂 \u2028", "completion": "x", "input_ids": [1, 2, 30000],
             "labels": [-100, -100, 30000]},
            {"id": "b", "input_ids": [], "labels": []},
            {"labels": [1, 2], "input_ids": [3, 4], "id": "keys in another order"}]
    data = jsonl_bytes(rows)
    assert "日本 🙂".encode() in data  # UTF-8, not \u escapes
    assert [json.loads(line) for line in data.decode().split("\n")[:-1]] == rows
    (tmp_path / "rows.jsonl").write_bytes(data)
    assert read_jsonl(tmp_path / "rows.jsonl") == rows


def test_read_jsonl_reads_what_json_reads_where_orjson_refuses(tmp_path: Path) -> None:
    """NaN and integers beyond 64 bits (json writes both) are read as json.loads reads them; blank lines skipped."""
    rows = [{"score": float("nan")}, {"big": 2 ** 70}, {"plain": [1, "x"]}]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows) + "\r\n", encoding="utf-8")
    got = read_jsonl(tmp_path / "odd.jsonl")
    assert math.isnan(got[0]["score"]) and got[1:] == rows[1:]


def test_write_jsonl_keeps_what_orjson_would_change(tmp_path: Path) -> None:
    """orjson writes NaN as null and refuses int keys and huge ints: those rows are written by json."""
    rows = [{"score": float("nan"), "none": None}, {"inf": float("inf")}, {1: "int key"}, {"big": 2 ** 70},
            {"text": "null", "n": 0.1}, {"plain": ["日本", 1.5e300]}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    got = read_jsonl(tmp_path / "rows.jsonl")
    assert math.isnan(got[0]["score"]) and got[0]["none"] is None and got[1]["inf"] == float("inf")
    assert got[2:] == [{"1": "int key"}, *rows[3:]]  # json's own reading of an int key
    assert (tmp_path / "rows.jsonl").read_bytes().count(b"\n") == len(rows)


def test_parts_are_appended_whole_and_removed(tmp_path: Path) -> None:
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes(range(256)) * (1000 * i) + b"end %d\n" % i)
    with open(tmp_path / "all.jsonl", "wb") as dst:
        dst.write(b"head\n")
        for part in parts:
            _append(dst, part)
    expected = b"head\n" + b"".join(bytes(range(256)) * (1000 * i) + b"end %d\n" % i for i in range(3))
    assert (tmp_path / "all.jsonl").read_bytes() == expected and not any(p.exists() for p in parts)


def test_render_in_worker_processes_writes_the_same_bytes_as_one_process(smoke_base, smoke_cfg, prepared, tmp_path,
                                                                       monkeypatch) -> None:
    """Forked workers render chunks of rows; the files, report and lengths are those of one process."""
    prep = tmp_path / "prepared"
    for split, rows in prepared.items():
        write_jsonl(prep / f"{split}.jsonl", rows)
    cfg = dataclasses.replace(smoke_cfg.prompt, eval_k_shot=2)
    monkeypatch.setattr(parallel, "CHUNK", 37)  # many chunks, the last of each file a short one
    monkeypatch.setattr(parallel, "MIN_ROWS", 0)
    reports = {}
    for n in (1, 3):
        monkeypatch.setattr(parallel, "workers", lambda n=n: n)
        reports[n] = render.run(dataclasses.replace(smoke_cfg, prompt=cfg), render.Paths(prep, smoke_base, tmp_path / f"out{n}", tmp_path / f"report{n}.json"))
    assert reports[1] == reports[3] and reports[1]["kshot_arm"]["rows"] == len(prepared["test"])
    for name in ("train", "val", "test", "test_kshot", "template", "template_kshot"):
        suffix = "json" if name.startswith("template") else "jsonl"
        one, three = (tmp_path / out / f"{name}.{suffix}" for out in ("out1", "out3"))
        assert one.read_bytes() == three.read_bytes()


def test_fast_tokenizer_is_what_transformers_loads_or_is_not_used(smoke_base: Path, tmp_path: Path) -> None:
    """render loads the tokenizer with `tokenizers` alone only when its files hash to what the
    base_model stage recorded from transformers; a changed file or an older checkpoint gets transformers."""
    from pipeline.core.models import FastTokenizer, load_fast_tokenizer

    reference = load_tokenizer(smoke_base)
    fast = load_fast_tokenizer(smoke_base)
    assert isinstance(fast, FastTokenizer)
    assert (fast.chat_template, fast.bos_token, fast.eos_token) == (reference.chat_template, reference.bos_token,
                                                                   reference.eos_token)
    texts = ["<|im_start|>user\nHello  there\n\n日本<|im_end|>", "x" * 50, ""]
    assert [e.ids for e in fast.backend_tokenizer.encode_batch(texts)] == reference(texts)["input_ids"]

    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(smoke_base, changed)
    spec = (changed / "tokenizer.json").read_text()
    (changed / "tokenizer.json").write_text(spec.replace('"<|im_end|>"', '"<|im_stop|>"', 1))
    assert not isinstance(load_fast_tokenizer(changed), FastTokenizer)
    (changed / "tokenizer.json").write_text(spec)
    assert isinstance(load_fast_tokenizer(changed), FastTokenizer)
    (changed / "chat_template.jinja").write_text("{{ messages }}")
    assert not isinstance(load_fast_tokenizer(changed), FastTokenizer)
    older = tmp_path / "older"  # a checkpoint materialized before the record existed
    shutil.copytree(smoke_base, older)
    info = json.loads((older / "model_info.json").read_text())
    del info["tokenizer"]
    (older / "model_info.json").write_text(json.dumps(info))
    assert not isinstance(load_fast_tokenizer(older), FastTokenizer)

"""Prompt design, as pure string formatting: ``(example, template) -> (prompt, completion)``.

A :class:`Template` is either a chat template over ``messages`` (``kind: chat``: the
tokenizer's own, or one from ``conf/prompt/`` such as chatml) or a Jinja template of
``instruction``/``input`` (``kind: jinja``: alpaca, plain, a user's file). Its
:meth:`Template.hash` travels with the rendered data and the trained weights, so
evaluation can refuse prompts rendered differently from the ones the model was trained on.

:func:`segments` splits the full text into pieces the model reads and pieces it learns
(every assistant turn of a multi-turn conversation); :func:`render` is its single-answer
view. Jinja templates render single-turn examples only: a multi-turn conversation is
refused with a message naming ``prompt=chat``/``prompt=chatml``, because pasting turns
into an instruction template would invent a format no model was trained on.
Tokenization and masking are not done here (see the render stage).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.core.config import PromptConfig
from pipeline.core.errors import PromptError


@dataclass(frozen=True)
class Template:
    """Everything that decides the text a model sees."""

    name: str
    kind: str  # chat | jinja
    system: str | None
    template: str | None  # jinja source (kind=jinja)
    chat_template: str | None  # the tokenizer's chat template (kind=chat)
    bos_token: str
    eos_token: str
    train_on: str = "all_assistant"  # all_assistant | last_assistant: labels, so part of the identity
    k_shot: int = 0
    shot_seed: int = 0

    def hash(self) -> str:
        """Content hash of the template: equal hashes render equal text."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hash": self.hash()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Template":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def read_template_file(cfg: PromptConfig) -> PromptConfig:
    """The config with ``template`` replaced by the text of ``template_file`` (when set).

    Called by the render entry point: the file's text, not its path, is what the
    template hash covers, so editing the file invalidates everything rendered from it.
    """
    if not cfg.template_file:
        return cfg
    try:
        text = Path(cfg.template_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"prompt.template_file: cannot read {cfg.template_file}: {err}") from None
    return replace(cfg, template=text)


def make_template(cfg: PromptConfig, chat_template: str | None, bos_token: str | None, eos_token: str) -> Template:
    """Bind a prompt config to a tokenizer's chat template and special tokens.

    ``kind=chat`` uses ``cfg.template`` when it is set (e.g. chatml) and the tokenizer's
    chat template otherwise.
    """
    own = cfg.template if cfg.kind == "chat" else None
    if cfg.kind == "chat" and not (own or chat_template):
        raise PromptError(f"prompt={cfg.name}: kind=chat but the tokenizer has no chat template; "
                          "choose prompt=chatml, prompt=alpaca or prompt=plain")
    for source in (own, cfg.template if cfg.kind == "jinja" else None):
        if source:
            try:
                _compile(source)
            except TemplateError as err:
                raise PromptError(f"prompt={cfg.name}: the template does not parse: {err}") from None
    return Template(
        name=cfg.name,
        kind=cfg.kind,
        system=cfg.system,
        template=cfg.template if cfg.kind == "jinja" else None,
        chat_template=(own or chat_template) if cfg.kind == "chat" else None,
        bos_token=bos_token or "",
        eos_token=eos_token,
        train_on=cfg.train_on,
        k_shot=cfg.k_shot,
        shot_seed=cfg.shot_seed,
    )


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> "jinja2.Template":
    """Compile once per template text; rendering 100k examples must not re-parse it."""
    # The settings transformers uses for chat templates, so our rendering is identical;
    # StrictUndefined turns a misspelt variable into an error instead of empty text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _render_chat(source: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                 special: tuple[tuple[str, str], ...]) -> str:
    """``compiled.render(messages=..., add_generation_prompt=..., **dict(special))``, without Jinja per example when exact.

    When the template passes message contents to its output verbatim and decides
    nothing from them (:func:`_transparent`), the text depends on the contents only by
    substitution: render once per sequence of roles with placeholders, then substitute.
    """
    if not _transparent(source):
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **dict(special))
    skeleton = _skeleton(source, tuple([m["role"] for m in messages]), add_generation_prompt, special)
    return skeleton.format(*[m["content"] for m in messages])


_HOLE = re.compile("\ue000(\\d+)\ue001")  # a placeholder content: private-use characters around the index


@functools.lru_cache(maxsize=1024)
def _skeleton(source: str, roles: tuple[str, ...], add_generation_prompt: bool,
              special: tuple[tuple[str, str], ...]) -> str:
    """The template's output for these roles as a ``str.format`` string: literal text (braces
    doubled) with a ``{i}`` where message ``i``'s content goes."""
    holes = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
    text = _compile(source).render(messages=holes, add_generation_prompt=add_generation_prompt, **dict(special))
    pieces = _HOLE.split(text)  # literal, index, literal, index, ..., literal
    return "".join("{" + p + "}" if k % 2 else p.replace("{", "{{").replace("}", "}}") for k, p in enumerate(pieces))


_MESSAGE_FIELDS = ("role", "content")


@functools.lru_cache(maxsize=16)
def _transparent(source: str) -> bool:
    """Whether a chat template uses message contents only by writing them out unchanged.

    Checked on the template's syntax tree, conservatively: ``messages`` is only looped
    over (whole or sliced), indexed by a constant, or measured (``|length``); a message
    is only asked for its ``role`` and ``content``; and a ``content`` reaches nothing
    but an output statement, through string concatenation (``+``, ``~``) only, outside
    macros and ``{% set %}``/``{% filter %}`` blocks. Then the output is a function of
    the roles, with the contents pasted in. Anything else (a filter such as ``trim``,
    a test on the content, ``tojson``) is not transparent and is rendered per example.
    """
    from jinja2 import nodes

    tree = _compile(source).environment.parse(source)
    parent: dict[int, Any] = {}
    for node in tree.find_all(nodes.Node):
        for child in node.iter_child_nodes():
            parent[id(child)] = node
    loops = [n for n in tree.find_all(nodes.For) if _is_messages(n.iter) or
             (isinstance(n.iter, nodes.Getitem) and isinstance(n.iter.arg, nodes.Slice) and _is_messages(n.iter.node))]
    if any(not isinstance(n.target, nodes.Name) for n in loops):
        return False
    names = {n.target.name for n in loops}
    targets, iters = {id(n.target) for n in loops}, {id(n.iter) for n in loops}

    def is_message(node: Any) -> bool:  # a loop variable, or messages[<constant int>]
        return (isinstance(node, nodes.Name) and node.name in names) or (
            isinstance(node, nodes.Getitem) and _is_messages(node.node) and isinstance(node.arg, nodes.Const)
            and type(node.arg.value) is int)

    def field(node: Any) -> str | None:  # "role"/"content" when node reads that field of a message
        if isinstance(node, nodes.Getattr) and is_message(node.node):
            return node.attr
        if isinstance(node, nodes.Getitem) and is_message(node.node) and isinstance(node.arg, nodes.Const):
            return node.arg.value if isinstance(node.arg.value, str) else None
        return None

    for node in tree.find_all(nodes.Name):
        if node.name not in names | {"messages"} or id(node) in targets:
            continue
        up = parent.get(id(node))
        if node.ctx != "load":
            return False
        if node.name == "messages":
            ok = id(node) in iters or id(up) in iters or is_message(up) or (
                isinstance(up, nodes.Filter) and up.name == "length" and up.node is node)
            if not ok:
                return False
            if is_message(up) and field(parent.get(id(up))) not in _MESSAGE_FIELDS:
                return False
        elif field(up) not in _MESSAGE_FIELDS:
            return False
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if field(node) != "content":
            continue
        up = parent.get(id(node))
        while isinstance(up, (nodes.Add, nodes.Concat)):
            up = parent.get(id(up))
        if not isinstance(up, nodes.Output):
            return False
        while up is not None:
            if isinstance(up, (nodes.Macro, nodes.CallBlock, nodes.AssignBlock, nodes.FilterBlock)):
                return False
            up = parent.get(id(up))
    return True


def _is_messages(node: Any) -> bool:
    from jinja2 import nodes

    return isinstance(node, nodes.Name) and node.name == "messages"


def user_message(example: Mapping[str, Any]) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    return example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")


Segment = tuple[str, bool]  # (text, learnt): learnt text is an assistant turn and gets labels


def segments(example: Mapping[str, Any], template: Template, shots: Sequence[Mapping[str, Any]] = ()) -> list[Segment]:
    """The full training text of one example, cut into read and learnt pieces, in order.

    Every assistant turn of the example is a learnt piece ending with the end-of-turn
    token (the caller may unlearn all but the last: ``train_on``); everything else,
    including the ``shots`` (exemplars, rendered as earlier turns or earlier prompts),
    is read only. ``"".join(text for text, _ in segments(...))`` is the training text.
    """
    try:
        if template.kind == "chat":
            return _chat_segments(example, template, shots)
        if example.get("messages"):
            raise PromptError(f"prompt={template.name}: example {example.get('id')!r} is a {len(example['messages'])}-"
                              "turn conversation, and Jinja instruction templates render single-turn examples "
                              "only; use prompt=chat or prompt=chatml for conversations")
        compiled = _compile(template.template or "")
        prefix = "".join(_jinja_prompt(compiled, shot, template) + shot["output"] + "\n\n" for shot in shots)
        return [(prefix + _jinja_prompt(compiled, example, template), False),
                (example["output"] + template.eos_token, True)]
    except PromptError:
        raise
    except TemplateError as err:  # an undefined variable, a syntax error, raise_exception()
        raise PromptError(f"prompt={template.name}: cannot render example {example.get('id')!r}: {err}") from None


def render(example: Mapping[str, Any], template: Template, shots: Sequence[Mapping[str, Any]] = ()) -> tuple[str, str]:
    """Return ``(prompt, completion)`` for one example: the last answer, and all text before it.

    ``prompt + completion`` is the full training text; the completion ends with the
    end-of-turn token so the tuned model learns to stop.
    """
    pieces = segments(example, template, shots)
    return "".join(text for text, _ in pieces[:-1]), pieces[-1][0]


def _jinja_prompt(compiled: "jinja2.Template", example: Mapping[str, Any], template: Template) -> str:
    return compiled.render(instruction=example["instruction"], input=example.get("input", ""),
                           system=template.system, task=example.get("task", ""))


def conversation(example: Mapping[str, Any], template: Template,
                 shots: Sequence[Mapping[str, Any]] = ()) -> tuple[list[dict[str, str]], int]:
    """The messages a chat template renders, and the index of the first turn that can be learnt."""
    turns = example.get("messages") or [{"role": "user", "content": user_message(example)},
                                        {"role": "assistant", "content": example["output"]}]
    system = [t for t in turns[:1] if t["role"] == "system"]  # the data's own system turn wins
    if not system and template.system:
        system = [{"role": "system", "content": template.system}]
    shown = [turn for shot in shots for turn in ({"role": "user", "content": user_message(shot)},
                                                  {"role": "assistant", "content": shot["output"]})]
    head = system + shown
    return head + [t for t in turns if t["role"] != "system"], len(head)


def _chat_segments(example: Mapping[str, Any], template: Template, shots: Sequence[Mapping[str, Any]]) -> list[Segment]:
    messages, first = conversation(example, template, shots)
    source = template.chat_template or ""
    special = (("bos_token", template.bos_token), ("eos_token", template.eos_token))
    out: list[Segment] = []
    done = ""  # the text covered by `out` so far
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        prompt = _render_chat(source, messages[:i], True, special)
        full = _render_chat(source, messages[:i + 1], False, special)
        if not (full.startswith(prompt) and prompt.startswith(done)):
            raise PromptError(f"prompt={template.name}: the chat template renders a conversation's start "
                              "differently once later turns are added, so turns cannot be masked exactly")
        # Keep everything up to the end-of-turn token; the newline after it belongs to the next turn.
        answer = full[len(prompt):].rstrip("\n")
        out += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return out

"""Rendering a chat template without Jinja per example: the fast path of prompt rendering.

:func:`reference_render_chat` is the plain definition: Jinja renders the template over the
messages. :func:`render_chat` gives the same text: when a template writes message contents
out unchanged and decides nothing from them (:func:`transparent`), its output for a given
sequence of roles is a *skeleton* with holes where the contents go, rendered once and
filled by ``str.format``. Any other template is rendered per example by the reference.
``tests/test_render_pieces.py`` compares the two on real chat templates.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from pipeline.prompting.jinja import compile_template


def reference_render_chat(source: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                          special: tuple[tuple[str, str], ...]) -> str:
    """The chat template rendered by Jinja over ``messages``: what :func:`render_chat` must equal."""
    return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **dict(special))


def render_chat(source: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                 special: tuple[tuple[str, str], ...]) -> str:
    """``compiled.render(messages=..., add_generation_prompt=..., **dict(special))``, without Jinja per example when exact.

    When the template passes message contents to its output verbatim and decides
    nothing from them (:func:`transparent`), the text depends on the contents only by
    substitution: render once per sequence of roles with placeholders, then substitute.
    """
    if not transparent(source):
        return reference_render_chat(source, messages, add_generation_prompt, special)
    skeleton = _skeleton(source, tuple([m["role"] for m in messages]), add_generation_prompt, special)
    return skeleton.format(*[m["content"] for m in messages])


_HOLE = re.compile("\ue000(\\d+)\ue001")  # a placeholder content: private-use characters around the index


@functools.lru_cache(maxsize=1024)
def _skeleton(source: str, roles: tuple[str, ...], add_generation_prompt: bool,
              special: tuple[tuple[str, str], ...]) -> str:
    """The template's output for these roles as a ``str.format`` string: literal text (braces
    doubled) with a ``{i}`` where message ``i``'s content goes."""
    holes = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
    text = compile_template(source).render(messages=holes, add_generation_prompt=add_generation_prompt, **dict(special))
    pieces = _HOLE.split(text)  # literal, index, literal, index, ..., literal
    return "".join("{" + p + "}" if k % 2 else p.replace("{", "{{").replace("}", "}}") for k, p in enumerate(pieces))


_MESSAGE_FIELDS = ("role", "content")


@functools.lru_cache(maxsize=16)
def transparent(source: str) -> bool:
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

    tree = compile_template(source).environment.parse(source)
    parent: dict[int, Any] = {}
    for node in tree.find_all(nodes.Node):
        for child in node.iter_child_nodes():
            parent[id(child)] = node
    loops = [n for n in tree.find_all(nodes.For) if _is_messages(n.iter) or
             (isinstance(n.iter, nodes.Getitem) and isinstance(n.iter.arg, nodes.Slice) and _is_messages(n.iter.node))]
    if any(not isinstance(n.target, nodes.Name) for n in loops):
        return False
    reads = _MessageReads({n.target.name for n in loops}, {id(n.target) for n in loops}, {id(n.iter) for n in loops})
    return _names_used_plainly(tree, parent, reads) and _contents_only_output(tree, parent, reads)


@dataclass(frozen=True)
class _MessageReads:
    """The loops over ``messages`` of a template: their variables, and the nodes that bind and iterate."""

    names: set[str]
    targets: set[int]
    iters: set[int]

    def is_message(self, node: Any) -> bool:
        """A loop variable, or ``messages[<constant int>]``."""
        from jinja2 import nodes

        return (isinstance(node, nodes.Name) and node.name in self.names) or (
            isinstance(node, nodes.Getitem) and _is_messages(node.node) and isinstance(node.arg, nodes.Const)
            and type(node.arg.value) is int)

    def field(self, node: Any) -> str | None:
        """``"role"``/``"content"`` when ``node`` reads that field of a message."""
        from jinja2 import nodes

        if isinstance(node, nodes.Getattr) and self.is_message(node.node):
            return node.attr
        if isinstance(node, nodes.Getitem) and self.is_message(node.node) and isinstance(node.arg, nodes.Const):
            return node.arg.value if isinstance(node.arg.value, str) else None
        return None


def _names_used_plainly(tree: Any, parent: dict[int, Any], reads: _MessageReads) -> bool:
    """``messages`` only looped over, indexed by a constant or measured; a message only asked for its role and content."""
    from jinja2 import nodes

    for node in tree.find_all(nodes.Name):
        if node.name not in reads.names | {"messages"} or id(node) in reads.targets:
            continue
        up = parent.get(id(node))
        if node.ctx != "load":
            return False
        if node.name == "messages":
            ok = id(node) in reads.iters or id(up) in reads.iters or reads.is_message(up) or (
                isinstance(up, nodes.Filter) and up.name == "length" and up.node is node)
            if not ok:
                return False
            if reads.is_message(up) and reads.field(parent.get(id(up))) not in _MESSAGE_FIELDS:
                return False
        elif reads.field(up) not in _MESSAGE_FIELDS:
            return False
    return True


def _contents_only_output(tree: Any, parent: dict[int, Any], reads: _MessageReads) -> bool:
    """Every ``content`` reaches only an output statement (through concatenation), outside macros and blocks."""
    from jinja2 import nodes

    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if reads.field(node) != "content":
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

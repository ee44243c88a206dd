"""Render conversations to text, and know which characters belong to supervised turns.

A rendered conversation carries the character spans of each supervised turn's content plus its terminator
(end-of-turn marker and/or EOS). The encoder tokenizes the whole text once with offsets and supervises the
tokens inside those spans, so a response template that tokenizes differently in context (TRL #1820) cannot
shift the mask.

Templates:
- the tokenizer's own Jinja `chat_template` (used by `auto` when the tokenizer has one; a literal Jinja string
  in `data.template` is used the same way). Spans come from rendering prefixes: the assistant turn `i` spans
  from the end of `render(turns[:i], add_generation_prompt=True)` to the end of `render(turns[:i+1])`, minus
  trailing whitespace. A turn that does not end with EOS or an end-of-turn token gets the tokenizer's EOS
  inserted (counted; a model trained without it never stops, LLaMA-Factory #5145).
- `chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n`, with the tokenizer's EOS after each assistant
  `<|im_end|>` unless EOS is `<|im_end|>` itself.
- `plain`: `System\\n\\n` + `User: ...\\n` + `Assistant: ...<eos>\\n`, for base models with no chat format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .formats import Turn
from .readers import DataError

log = logging.getLogger(__name__)

TEMPLATES = ("auto", "chatml", "plain")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eot|>")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # supervised character ranges [start, end)
    eos_added: int = 0  # turns that lacked a terminator and got EOS inserted


class ChatTemplate:
    """Base: render(turns) -> Rendered; prompt(turns) -> text ending with the assistant header."""

    name = "base"

    def __init__(self, tokenizer: Any):
        self.eos = tokenizer.eos_token or ""

    def render(self, turns: list[Turn]) -> Rendered:
        raise NotImplementedError

    def prompt(self, turns: list[Turn]) -> str:
        raise NotImplementedError


class _Builtin(ChatTemplate):
    """Templates built here, turn by turn, so spans are known exactly while rendering."""

    def head(self, role: str) -> str:
        raise NotImplementedError

    def tail(self, role: str) -> str:
        raise NotImplementedError

    def render(self, turns: list[Turn]) -> Rendered:
        parts: list[str] = []
        spans = []
        pos = 0
        for t in turns:
            head, tail = self.head(t.role), self.tail(t.role)
            body = t.content + tail
            if t.train:
                start = pos + len(head)
                spans.append((start, start + len(body.rstrip()) if body.strip() else start))
            parts += [head, body]
            pos += len(head) + len(body)
        return Rendered("".join(parts), spans)

    def prompt(self, turns: list[Turn]) -> str:
        return "".join(self.head(t.role) + t.content + self.tail(t.role) for t in turns) + self.head(
            "assistant"
        )


class ChatML(_Builtin):
    name = "chatml"

    def head(self, role: str) -> str:
        return f"<|im_start|>{role}\n"

    def tail(self, role: str) -> str:
        eos = self.eos if role == "assistant" and self.eos != "<|im_end|>" else ""
        return f"<|im_end|>{eos}\n"


class Plain(_Builtin):
    name = "plain"
    HEADS = {"system": "", "user": "User: ", "assistant": "Assistant: ", "tool": "Tool: "}

    def head(self, role: str) -> str:
        return self.HEADS[role]

    def tail(self, role: str) -> str:
        if role == "system":
            return "\n\n"
        return (self.eos if role == "assistant" else "") + "\n"


class HFTemplate(ChatTemplate):
    """The tokenizer's Jinja chat template, with spans found by rendering prefixes."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any, source: str | None = None):
        super().__init__(tokenizer)
        self.tokenizer = tokenizer
        self.source = source  # a literal Jinja template, or None for tokenizer.chat_template
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        self.terminators = tuple(
            sorted({*END_OF_TURN, *(s for s in specials if s), *([self.eos] if self.eos else [])})
        )
        self._tool_as_user = False

    def _apply(self, msgs: list[dict], gen: bool) -> str:
        if self._tool_as_user:
            msgs = [{**m, "role": "user"} if m["role"] == "tool" else m for m in msgs]
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.source, tokenize=False, add_generation_prompt=gen
        )

    def _full(self, msgs: list[dict], gen: bool) -> str:
        try:
            return self._apply(msgs, gen)
        except Exception:
            if self._tool_as_user or not any(m["role"] == "tool" for m in msgs):
                raise
            self._tool_as_user = True  # many templates reject a "tool" role; show tool output as a user turn
            log.warning("chat template rejects role 'tool'; rendering tool outputs as user turns")
            return self._apply(msgs, gen)

    def prompt(self, turns: list[Turn]) -> str:
        return self._full([{"role": t.role, "content": t.content} for t in turns], gen=True)

    def render(self, turns: list[Turn]) -> Rendered:
        msgs = [{"role": t.role, "content": t.content} for t in turns]
        full = self._full(msgs, gen=False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, t in enumerate(turns):
            if not t.train:
                continue
            span = self._prefix_span(msgs, i, full) or self._search_span(full, t.content, cursor)
            spans.append(span)
            cursor = span[1]
        return self._ensure_eos(full, spans)

    def _prefix_span(self, msgs: list[dict], i: int, full: str) -> tuple[int, int] | None:
        if i == 0:
            return None  # templates cannot render an empty conversation with a generation prompt
        before = self._apply(msgs[:i], gen=msgs[i]["role"] == "assistant")
        upto = self._apply(msgs[: i + 1], gen=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            return None
        end = max(len(before), len(upto.rstrip()))
        return len(before), end

    def _search_span(self, full: str, content: str, cursor: int) -> tuple[int, int]:
        """Fallback for templates that rewrite earlier turns: find the content, then its terminator."""
        start = full.find(content, cursor) if content else -1
        if start < 0:
            raise DataError(f"chat template output does not contain the turn text {content[:40]!r}")
        end = start + len(content)
        rest = full[end:]
        for term in self.terminators:
            stripped = rest.lstrip(" ")
            if stripped.startswith(term):
                end += len(rest) - len(stripped) + len(term)
                break
        return start, end

    def _ensure_eos(self, text: str, spans: list[tuple[int, int]]) -> Rendered:
        added = 0
        out_spans = []
        shift = 0
        for s, e in spans:
            s, e = s + shift, e + shift
            if self.eos and not text[s:e].endswith(self.terminators):
                text = text[:e] + self.eos + text[e:]
                e += len(self.eos)
                shift += len(self.eos)
                added += 1
            out_spans.append((s, e))
        return Rendered(text, out_spans, added)


def get_template(tokenizer: Any, name: str = "auto") -> ChatTemplate:
    """`auto`: the tokenizer's chat template if it has one, else chatml; or chatml | plain | a Jinja string."""
    if name == "auto":
        return HFTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else ChatML(tokenizer)
    if name == "chatml":
        return ChatML(tokenizer)
    if name == "plain":
        return Plain(tokenizer)
    if "{{" in name or "{%" in name:
        return HFTemplate(tokenizer, source=name)
    raise DataError(
        f"data.template: {name!r} is not one of {', '.join(TEMPLATES)} (or a Jinja chat template)"
    )

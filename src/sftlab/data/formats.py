"""Turn raw records of each `data.format` into one of four canonical shapes, validating every field.

- Chat: turns of (role, content, supervised?) for alpaca, messages, sharegpt (and seq2seq on a causal LM).
- Text: one document (format text), trained on every token.
- Labeled: text (+ text_pair) and a label (format classification).
- Pair: source and target (format seq2seq, or single-turn chat formats on an encoder-decoder).

Every error names the record's `path:line`, the field, what was expected and what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .readers import DataError, RawRecord, field_list, short

FORMATS = ("text", "alpaca", "messages", "sharegpt", "classification", "seq2seq")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker -> (role, supervised by default). function_call is the assistant calling a tool;
# observation is the tool's answer, shown to the model but never trained on.
SHAREGPT_ROLES = {
    "system": ("system", False),
    "human": ("user", False),
    "user": ("user", False),
    "gpt": ("assistant", True),
    "assistant": ("assistant", True),
    "function_call": ("assistant", True),
    "observation": ("tool", False),
    "tool": ("tool", False),
}


@dataclass
class Turn:
    role: str
    content: str
    train: bool  # supervise this turn's tokens (assistant turns unless a record says otherwise)


@dataclass
class Chat:
    where: str
    turns: list[Turn] = field(default_factory=list)


@dataclass
class Text:
    where: str
    text: str


@dataclass
class Labeled:
    where: str
    text: str
    text_pair: str | None
    label: str | int


@dataclass
class Pair:
    where: str
    source: str
    target: str


Record = Chat | Text | Labeled | Pair


def _err(where: str, key: str, expected: str, got: Any) -> DataError:
    return DataError(f"{where}: {key}: {expected} (got {short(got)})")


def _need(rec: RawRecord, key: str) -> Any:
    if key not in rec.fields or rec.fields[key] is None:
        raise DataError(f"{rec.where}: {key}: missing required field (record has {field_list(rec.fields)})")
    return rec.fields[key]


def _string(where: str, key: str, value: Any, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _err(where, key, "expected a string", value)
    if not allow_empty and not value.strip():
        raise _err(where, key, "expected non-empty text", value)
    return value


def _content(where: str, key: str, value: Any) -> str:
    """A message content: a string, or a list of {"type": "text", "text"|"value": str} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            k = f"{key}[{j}]"
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, dict):
                raise _err(where, k, "expected a {type: text, text: ...} part", part)
            if part.get("type", "text") != "text":
                raise _err(
                    where, f"{k}.type", "expected 'text' (only text content is supported)", part.get("type")
                )
            text = part.get("text", part.get("value"))
            parts.append(_string(where, f"{k}.text", text))
        return "".join(parts)
    raise _err(where, key, "expected a string or a list of text parts", value)


def _weight(where: str, key: str, msg: dict, default: bool) -> bool:
    """OpenAI's `weight` / LLaMA-Factory's `loss_weight` (0 or 1) override whether a turn is trained."""
    for k in ("weight", "loss_weight"):
        if k in msg and msg[k] is not None:
            w = msg[k]
            if isinstance(w, bool) or not isinstance(w, int | float) or w not in (0, 1):
                raise _err(where, f"{key}.{k}", "expected 0 or 1", w)
            return bool(w)
    return default


def _with_system(turns: list[Turn], system: str | None) -> list[Turn]:
    if system and not any(t.role == "system" for t in turns):
        return [Turn("system", system, False), *turns]
    return turns


def _check_chat(where: str, key: str, turns: list[Turn]) -> Chat:
    if not any(t.role == "assistant" for t in turns):
        roles = ", ".join(t.role for t in turns) or "none"
        raise DataError(f"{where}: {key}: expected at least one assistant turn (got roles {roles})")
    return Chat(where, turns)


def parse_alpaca(rec: RawRecord, system_prompt: str | None) -> Chat:
    w = rec.where
    instruction = _string(w, "instruction", _need(rec, "instruction"))
    extra = rec.fields.get("input")
    extra = "" if extra is None else _string(w, "input", extra)
    output = _string(w, "output", _need(rec, "output"))
    prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    if not prompt.strip():
        raise _err(w, "instruction", "expected non-empty text", instruction)
    system = rec.fields.get("system")
    system = system_prompt if system in (None, "") else _string(w, "system", system)
    turns = [Turn("user", prompt, False), Turn("assistant", output, True)]
    return Chat(w, _with_system(turns, system))


def parse_messages(rec: RawRecord, system_prompt: str | None) -> Chat:
    w = rec.where
    msgs = _need(rec, "messages")
    if not isinstance(msgs, list) or not msgs:
        raise _err(w, "messages", "expected a non-empty list of {role, content}", msgs)
    turns = []
    for i, m in enumerate(msgs):
        key = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(w, key, "expected an object with role and content", m)
        if "role" not in m:
            raise DataError(f"{w}: {key}.role: missing required field")
        role = m["role"]
        if role not in ROLES:
            raise _err(w, f"{key}.role", f"expected one of {', '.join(ROLES)}", role)
        if "content" not in m or m["content"] is None:
            raise DataError(f"{w}: {key}.content: missing required field")
        content = _content(w, f"{key}.content", m["content"])
        turns.append(Turn(role, content, _weight(w, key, m, role == "assistant")))
    return _check_chat(w, "messages", _with_system(turns, system_prompt))


def parse_sharegpt(rec: RawRecord, system_prompt: str | None) -> Chat:
    w = rec.where
    convs = _need(rec, "conversations")
    if not isinstance(convs, list) or not convs:
        raise _err(w, "conversations", "expected a non-empty list of {from, value}", convs)
    turns = []
    for i, m in enumerate(convs):
        key = f"conversations[{i}]"
        if not isinstance(m, dict):
            raise _err(w, key, "expected an object with from and value", m)
        if "from" not in m:
            raise DataError(f"{w}: {key}.from: missing required field")
        speaker = m["from"]
        if speaker not in SHAREGPT_ROLES:
            raise _err(w, f"{key}.from", f"expected one of {', '.join(SHAREGPT_ROLES)}", speaker)
        if "value" not in m or m["value"] is None:
            raise DataError(f"{w}: {key}.value: missing required field")
        role, train = SHAREGPT_ROLES[speaker]
        turns.append(Turn(role, _content(w, f"{key}.value", m["value"]), _weight(w, key, m, train)))
    system = rec.fields.get("system")
    system = system_prompt if system in (None, "") else _string(w, "system", system)
    tools = rec.fields.get("tools")
    if tools not in (
        None,
        "",
        [],
    ):  # glaive/LLaMA-Factory style: the callable tools, shown in the system turn
        tools = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = (system + "\n\n" if system else "") + "Available tools:\n" + tools
    return _check_chat(w, "conversations", _with_system(turns, system))


def parse_label(where: str, value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _err(where, "label", "expected a string or integer class label", value)
    if isinstance(value, str) and not value.strip():
        raise _err(where, "label", "expected a non-empty class label", value)
    return value


def parse_classification(rec: RawRecord) -> Labeled:
    w = rec.where
    text = _string(w, "text", _need(rec, "text"))
    pair = rec.fields.get("text_pair")
    pair = None if pair is None else _string(w, "text_pair", pair)
    return Labeled(w, text, pair, parse_label(w, _need(rec, "label")))


def parse_record(rec: RawRecord, fmt: str, system_prompt: str | None = None) -> Record:
    """Validate one raw record of format `fmt` and return its canonical shape."""
    if fmt == "text":
        return Text(rec.where, _string(rec.where, "text", _need(rec, "text"), allow_empty=False))
    if fmt == "alpaca":
        return parse_alpaca(rec, system_prompt)
    if fmt == "messages":
        return parse_messages(rec, system_prompt)
    if fmt == "sharegpt":
        return parse_sharegpt(rec, system_prompt)
    if fmt == "classification":
        return parse_classification(rec)
    if fmt == "seq2seq":
        w = rec.where
        return Pair(w, _string(w, "source", _need(rec, "source")), _string(w, "target", _need(rec, "target")))
    raise ValueError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")


def as_chat(rec: Record, system_prompt: str | None = None) -> Chat:
    """A single-turn chat from a seq2seq pair (seq2seq data on a causal LM); chats pass through."""
    if isinstance(rec, Chat):
        return rec
    if isinstance(rec, Pair):
        turns = [Turn("user", rec.source, False), Turn("assistant", rec.target, True)]
        return Chat(rec.where, _with_system(turns, system_prompt))
    raise TypeError(f"{rec.where}: cannot use a {type(rec).__name__} record as a conversation")


def as_pair(rec: Record) -> Pair:
    """A (source, target) pair from a seq2seq record or a single-turn chat (instruction data on T5)."""
    if isinstance(rec, Pair):
        return rec
    if isinstance(rec, Chat):
        prompt = [t for t in rec.turns if t.role != "assistant"]
        answers = [t for t in rec.turns if t.role == "assistant"]
        if len(answers) != 1 or rec.turns[-1].role != "assistant":
            raise DataError(
                f"{rec.where}: turns: expected one final assistant turn for a seq2seq model "
                f"(got {len(answers)} assistant turns)"
            )
        return Pair(rec.where, "\n\n".join(t.content for t in prompt), answers[0].content)
    raise TypeError(f"{rec.where}: cannot use a {type(rec).__name__} record as a source/target pair")

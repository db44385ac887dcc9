"""Conversational rows (TRL's message-list shape), read into schema rows of message lists.

The loaders know no tokenizer, so a conversation stays a list of {role, content} messages
until `common.data.encode` renders it with the chat template. Every message and turn order
is checked here, so a bad conversation stops the run with its file, line, field and message.
"""
from __future__ import annotations

from common.data.schemas import Schema
from common.errors import DataError

ROLES = ("system", "user", "assistant")
# columns that hold message lists in TRL's conversational shapes (and UltraFeedback-binarized)
MESSAGE_COLUMNS = ("messages", "prompt", "completion", "response", "chosen", "rejected")


def is_conversational(row: object, schema: Schema) -> bool:
    """Whether a raw row holds a message list where standard rows hold text."""
    return isinstance(row, dict) and any(isinstance(row.get(schema.source(k)), list) for k in MESSAGE_COLUMNS)


def parse(raw: dict, schema: Schema, where: str) -> dict:
    """`raw` as `schema`'s row: sft {'messages'}, pair {'prompt', 'chosen', 'rejected'}, prompt {'prompt'}.

    SFT keeps the whole conversation (every assistant turn is trained on); a preference's
    answers may be whole conversations (implicit prompt, as UltraFeedback-binarized has
    them), split at their last turn.
    """
    def read(key):
        return _messages(raw, schema, key, where)
    if schema.name == "sft":
        if schema.source("messages") in raw:
            return {"messages": check_turns(read("messages"), where, schema.label("messages"), "user", "assistant")}
        prompt, answers = _prompt_and_answers(raw, schema, read, where, ("completion", "response", "chosen"))
        if not answers:
            raise DataError(f"{where}: field 'completion'", f"missing; row has {sorted(raw)}")
        answer_key, answer = next(iter(answers.items()))
        check_turns(prompt, where, schema.label("prompt"), "user", "user")
        check_turns(answer, where, schema.label(answer_key), "assistant", "assistant")
        return {"messages": prompt + answer}
    if schema.name not in ("pair", "prompt"):
        raise DataError(where, f"message lists are read for SFT, preference and RL-prompt rows, not {schema.name} "
                               "rows: write this file's fields as text")
    prompt, answers = _prompt_and_answers(raw, schema, read, where, ("chosen", "rejected"))
    row = {"prompt": check_turns(prompt, where, schema.label("prompt"), "user", "user")}
    if schema.name == "prompt":
        return row | ({"user": raw["user"]} if "user" in raw else {})
    for key in ("chosen", "rejected"):
        if key not in answers:
            raise DataError(f"{where}: {schema.label(key)}", f"missing; row has {sorted(raw)}")
        row[key] = check_turns(answers[key], where, schema.label(key), "assistant", "assistant")
    return row


def check_turns(messages: list, where: str, field: str, first: str, last: str) -> list:
    """`messages` if its roles alternate from `first` (a system message may open it) and end on `last`."""
    place = f"{where}: {field}"
    if not messages:
        raise DataError(place, "no messages")
    due = first
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if i or first != "user":
                raise DataError(f"{place} message {i}", "a system message may only open the conversation")
            continue
        if m["role"] != due:
            raise DataError(f"{place} message {i}", f"roles do not alternate: {m['role']!r} where {due!r} is due")
        if due == "assistant" and not m["content"].strip():
            raise DataError(f"{place} message {i}", "empty assistant turn")
        due = "assistant" if due == "user" else "user"
    if messages[-1]["role"] != last:
        why = ("there is no assistant response to train on" if last == "assistant"
               else "a prompt ends on the user's turn, which the policy or the answers follow")
        raise DataError(place, f"ends on a {messages[-1]['role']} turn: {why}")
    return messages


def _prompt_and_answers(raw: dict, schema: Schema, read, where: str, keys: tuple) -> tuple[list, dict]:
    """(prompt messages, {key: answer messages}) of a row with an explicit or an implicit prompt."""
    answers = {k: read(k) for k in keys if raw.get(schema.source(k)) is not None}
    whole = [k for k, v in answers.items() if v and v[0]["role"] != "assistant"]
    if whole:  # implicit prompt: every answer is the whole conversation
        prompt = answers[whole[0]][:-1]
        for key, answer in answers.items():
            if answer[:-1] != prompt:
                raise DataError(f"{where}: {schema.label(key)}", f"not the conversation of {whole[0]!r} with "
                                "another last turn (an implicit prompt must be the same in every answer)")
        return prompt, {k: v[-1:] for k, v in answers.items()}
    if raw.get(schema.source("prompt")) is not None:
        return read("prompt"), answers
    if schema.source("messages") in raw:  # an SFT conversation as an RL prompt: up to its last user turn
        messages = read("messages")
        return (messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages), answers
    raise DataError(f"{where}: {schema.label('prompt')}", f"missing; row has {sorted(raw)}")


def _messages(raw: dict, schema: Schema, key: str, where: str) -> list[dict]:
    """The messages in `key`'s column, each reduced to role and content (a text prompt is one user turn)."""
    place = f"{where}: {schema.label(key)}"
    value = raw.get(schema.source(key))
    if key == "prompt" and isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(place, f"expected a list of messages, got {type(value).__name__} {str(value)[:40]!r}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{place} message {i}", f"expected an object with 'role' and 'content', "
                                                     f"got {type(m).__name__}")
        for part in ("role", "content"):
            if m.get(part) is None:
                present = sorted(k for k in m if m[k] is not None)
                raise DataError(f"{place} message {i}", f"no {part!r}; it has {present}")
        if m["role"] not in ROLES:
            raise DataError(f"{place} message {i}", f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{place} message {i}", f"'content' is {type(m['content']).__name__}, not text")
        out.append({"role": m["role"], "content": m["content"]})
    return out

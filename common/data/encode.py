"""Turn rows into token ids the same way in every stage.

A sequence is prompt ids (BOS first when the tokenizer has one) followed by response
ids and EOS. Prompt and response are tokenised separately so the boundary between
them is exact (needed to mask the prompt and to read rewards on response tokens).
Conversational rows (message lists) are rendered with the tokenizer's chat template,
whatever --prompt_format says; an answer's text is what its turn adds to the render.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

from common.errors import ConfigError, DataError

IGNORE = -100


class Pretokenised:
    """A tokenizer that has tokenised `texts` in advance, in one batched call, and serves them from
    memory; any other text is tokenised as usual. Building a cache encodes tens of thousands of rows:
    one call per text (and a second for a long row, to truncate it) was most of the build's time."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        unique = list(dict.fromkeys(texts))
        self.known = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}

    def __call__(self, text, **kwargs):
        if isinstance(text, str) and kwargs == {"add_special_tokens": False} and text in self.known:
            return {"input_ids": list(self.known[text])}
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


class Skip(NamedTuple):
    """An encoder's answer for a row that carries no training signal (counted, not an error)."""
    reason: str


def render_prompt(tokenizer, prompt: Union[str, list], prompt_format: str) -> str:
    if isinstance(prompt, list):  # a conversation: the policy answers next
        return render_chat(tokenizer, prompt, generation_prompt=True)
    if prompt_format == "raw" or not prompt:
        return prompt
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return f"\n\nHuman: {prompt}\n\nAssistant:"


def render_chat(tokenizer, messages: list, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{tokenizer.name_or_path}: this data is conversational (message lists) and the tokenizer "
                          "has no chat template: give --chat_template FILE (a Jinja chat template, e.g. ChatML), "
                          "use a chat model's tokenizer (--tokenizer_name_or_path), or write the rows as text")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_turn(tokenizer, before: list, turn: list) -> str:
    """The text `turn` adds to the render of `before` with its generation prompt (the answer, its end marker)."""
    return _after(tokenizer, render_chat(tokenizer, before + turn, generation_prompt=False),
                  render_chat(tokenizer, before, generation_prompt=True))


def _after(tokenizer, text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise DataError(tokenizer.name_or_path, "its chat template does not render a conversation prefix by prefix "
                                                "(it rewrites earlier turns), so the answers cannot be located")
    return text[len(prefix):]


def prompt_ids(tokenizer, prompt: Union[str, list], prompt_format: str = "raw") -> list[int]:
    return with_bos(tokenizer, _ids(tokenizer, render_prompt(tokenizer, prompt, prompt_format)))


def response_ids(tokenizer, response: str) -> list[int]:
    return _ids(tokenizer, response) + [tokenizer.eos_token_id]


def answer_ids(tokenizer, prompt: Union[str, list], answer: Union[str, list]) -> list[int]:
    """A preference's answer: text, or assistant messages following the conversation `prompt`."""
    if isinstance(answer, list):
        return _closed(tokenizer, _ids(tokenizer, chat_turn(tokenizer, prompt, answer)))
    return response_ids(tokenizer, answer)


def _closed(tokenizer, ids: list[int]) -> list[int]:
    """A chat answer ends with EOS, added unless the template's end of turn already holds it (ChatML's)."""
    return ids if tokenizer.eos_token_id in ids else ids + [tokenizer.eos_token_id]


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """BOS first when the tokenizer has one (once: a chat template may have written it)."""
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def join(prompt: list[int], response: list[int], max_len: int, too_long: str) -> Optional[dict]:
    """Concatenate; too long: skip, or keep the prompt's last max_len/2 tokens and cut the response."""
    if len(prompt) + len(response) > max_len:
        if too_long == "skip":
            return None
        if len(prompt) > max_len // 2:
            prompt = prompt[-(max_len // 2):]
        response = response[: max_len - len(prompt)]
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response,
            "prompt_len": len(prompt)}


def encode_conversation(tokenizer, messages: list, max_len: int, too_long: str):
    """Multi-turn SFT: every assistant turn is trained on (its text and end marker), nothing else."""
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            context = _after(tokenizer, render_chat(tokenizer, messages[:i], generation_prompt=True), done)
            turn = chat_turn(tokenizer, messages[:i], [m])
            context_ids, turn_ids = _ids(tokenizer, context), _ids(tokenizer, turn)
            if i == len(messages) - 1:
                turn_ids = _closed(tokenizer, turn_ids)
            ids += context_ids + turn_ids
            labels += [IGNORE] * len(context_ids) + turn_ids
            done += context + turn
    ids, labels = with_bos(tokenizer, ids), [IGNORE] * (len(with_bos(tokenizer, ids)) - len(ids)) + labels
    if len(ids) > max_len:
        if too_long == "skip":
            return None
        ids, labels = ids[:max_len], labels[:max_len]
    trained = [i for i, x in enumerate(labels) if x != IGNORE]
    if not trained:
        return Skip(f"no assistant token within {max_len} tokens")
    return {"input_ids": ids, "labels": labels, "prompt_len": trained[0]}


def encode_sft(tokenizer, row: dict, max_len: int, prompt_format: str, too_long: str) -> Optional[dict]:
    if "messages" in row:
        return encode_conversation(tokenizer, row["messages"], max_len, too_long)
    return join(prompt_ids(tokenizer, row["prompt"], prompt_format),
                response_ids(tokenizer, row["response"]), max_len, too_long)


def encode_pair(tokenizer, row: dict, max_len: int, prompt_format: str, too_long: str) -> Optional[dict]:
    p = prompt_ids(tokenizer, row["prompt"], prompt_format)
    chosen = join(p, answer_ids(tokenizer, row["prompt"], row["chosen"]), max_len, too_long)
    rejected = join(p, answer_ids(tokenizer, row["prompt"], row["rejected"]), max_len, too_long)
    if chosen is None or rejected is None:
        return None
    return {"chosen_ids": chosen["input_ids"], "rejected_ids": rejected["input_ids"],
            "prompt_len": chosen["prompt_len"]}

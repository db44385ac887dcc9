"""Turn rows into token ids the same way in every stage.

A sequence is prompt ids (BOS first when the tokenizer has one) followed by response
ids and EOS. Prompt and response are tokenised separately so the boundary between
them is exact (needed to mask the prompt and to read rewards on response tokens).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

IGNORE = -100


class Skip(NamedTuple):
    """An encoder's answer for a row that carries no training signal (counted, not an error)."""
    reason: str


def render_prompt(tokenizer, prompt: str, prompt_format: str) -> str:
    if prompt_format == "raw" or not prompt:
        return prompt
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return f"\n\nHuman: {prompt}\n\nAssistant:"


def prompt_ids(tokenizer, prompt: str, prompt_format: str = "raw") -> list[int]:
    ids = tokenizer(render_prompt(tokenizer, prompt, prompt_format), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None else ids


def response_ids(tokenizer, response: str) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


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


def encode_sft(tokenizer, row: dict, max_len: int, prompt_format: str, too_long: str) -> Optional[dict]:
    return join(prompt_ids(tokenizer, row["prompt"], prompt_format),
                response_ids(tokenizer, row["response"]), max_len, too_long)


def encode_pair(tokenizer, row: dict, max_len: int, prompt_format: str, too_long: str) -> Optional[dict]:
    p = prompt_ids(tokenizer, row["prompt"], prompt_format)
    chosen = join(p, response_ids(tokenizer, row["chosen"]), max_len, too_long)
    rejected = join(p, response_ids(tokenizer, row["rejected"]), max_len, too_long)
    if chosen is None or rejected is None:
        return None
    return {"chosen_ids": chosen["input_ids"], "rejected_ids": rejected["input_ids"],
            "prompt_len": chosen["prompt_len"]}

"""Chat messages -> prompt token ids: the tokenizer's chat template, or a plain transcript."""
from __future__ import annotations

from aqlmkit.errors import AqlmkitError


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that ask the model for the next assistant turn.

    With a chat template, the special tokens come from the template (no second bos); without one,
    a 'role: text' transcript ending in 'assistant:' is tokenized normally.
    """
    if not messages:
        raise AqlmkitError("messages is empty: send at least one message")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise AqlmkitError("every message needs a string 'role' and a string 'content'")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])

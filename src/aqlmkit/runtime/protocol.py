"""OpenAI request bodies (the fields aqlmkit honours) and their mapping to :class:`SamplingParams`.

Unknown fields are ignored, as OpenAI-compatible servers commonly do, so clients that send
``logprobs: null`` or ``user`` still work; fields that would change the output but are not
supported (``n > 1``, ``logprobs``, ``echo``, several prompts) are refused with a 400 instead of
being silently dropped. Extensions (vLLM's names): ``top_k``, ``stop_token_ids``, ``ignore_eos``,
and ``return_token_ids`` (each choice / chunk also carries the generated token ids).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aqlmkit.errors import AqlmkitError
from aqlmkit.runtime.sampling import SamplingParams


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise AqlmkitError("only n=1 is supported")
        if self.logprobs not in (None, False):
            raise AqlmkitError("logprobs are not supported")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise AqlmkitError("at most 16 stop strings")
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, stop=tuple(stop),
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise AqlmkitError("echo is not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise AqlmkitError("send one prompt per request (a list of several prompts is not supported)")
            self.prompt = self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """String content, or the text parts of a list content joined (images are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise AqlmkitError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

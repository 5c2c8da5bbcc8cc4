"""OpenAI completion requests as batch-engine Requests, and batch-engine Results as OpenAI
responses and stream chunks, shaped as llama-cpp-python's own server shapes them."""
from __future__ import annotations

import random
import time
import uuid
from typing import Any, Callable

from ..engine.batch import Request, Result, SamplerSpec
from ..errors import SteerError
from ..profile import Profile

# request fields only llama-cpp-python's own completion path serves, with their "unused" values
_SERIAL_ONLY = {"logprobs": (None, False), "top_logprobs": (None,), "functions": (None,), "function_call": (None,),
                "tools": (None,), "tool_choice": (None,), "response_format": (None,), "mirostat_mode": (0,),
                "echo": (False,), "suffix": (None,), "logits_processor": (None,)}


def serial_only(kwargs: dict) -> list[str]:
    """The fields of a request that the batch engine cannot serve."""
    return [k for k, unused in _SERIAL_ONLY.items() if k in kwargs and kwargs[k] not in unused]


def to_request(llm, kwargs: dict, n_ctx_seq: int, profile: Profile | None, phase: str, trace: bool,
               on_text: Callable[[str], None] | None, cancelled: Callable[[], bool]) -> Request:
    """kwargs: what the server would hand create_chat_completion (messages) or
    create_completion (prompt)."""
    if "messages" in kwargs:
        prompt = llm.chat_tokens(kwargs["messages"], add_generation_prompt=True)
    else:
        prompt = llm.tokenize(str(kwargs.get("prompt") or "").encode("utf-8"), add_bos=True, special=True)
    if len(prompt) >= n_ctx_seq:
        raise SteerError(f"the prompt is {len(prompt)} tokens, more than a conversation's context "
                         f"({n_ctx_seq - 1} at most); shorten it or raise the server's --ctx")
    max_tokens = kwargs.get("max_tokens")
    if max_tokens is None or max_tokens <= 0:  # llama-cpp-python: up to the end of the context
        max_tokens = n_ctx_seq - len(prompt)
    stop = kwargs.get("stop") or []
    grammar = kwargs.get("grammar")
    seed = kwargs.get("seed")
    sampling = SamplerSpec(
        temperature=float(kwargs.get("temperature", 0.8)),
        top_k=int(kwargs.get("top_k", 40)), top_p=float(kwargs.get("top_p", 0.95)),
        min_p=float(kwargs.get("min_p", 0.05)),
        seed=random.getrandbits(32) if seed is None else int(seed),
        repeat_penalty=float(kwargs.get("repeat_penalty", 1.0)),
        frequency_penalty=float(kwargs.get("frequency_penalty", 0.0)),
        presence_penalty=float(kwargs.get("presence_penalty", 0.0)),
        logit_bias={int(t): float(b) for t, b in (kwargs.get("logit_bias") or {}).items()},
        grammar=None if grammar is None else getattr(grammar, "_grammar", grammar))
    return Request(prompt, profile, phase, max_tokens, sampling, [stop] if isinstance(stop, str) else list(stop),
                   trace, on_text, cancelled)


class Responder:
    """The OpenAI-shaped output of one request: an id and creation time shared by its chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None = None, role: bool = False, finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}

    def result(self, r: Result) -> dict:
        finish = "length" if r.finish_reason == "length" else "stop"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                      "finish_reason": finish}
            out = self._head("chat.completion") | {"choices": [choice]}
        else:
            choice = {"text": r.text, "index": 0, "logprobs": None, "finish_reason": finish}
            out = self._head("text_completion") | {"choices": [choice]}
        n_gen = len(r.tokens)
        out["usage"] = {"prompt_tokens": r.prompt_tokens, "completion_tokens": n_gen,
                        "total_tokens": r.prompt_tokens + n_gen}
        return out

"""Prompts typed on the command line: checked as text, wrapped as chat messages, completed once."""
from __future__ import annotations

from ..errors import SteerError


def check_text(text: str | None, what: str) -> None:
    # bytes that are not UTF-8 reach Python's argv as lone surrogates, which no tokenizer takes
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise SteerError(f"{what}: not valid UTF-8 text") from None


def as_messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def complete(llm, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
             seed: int) -> str:
    """One answer to `prompt` (a user message in the chat template with `chat`), refused with
    a one-line error before any work when the prompt does not fit the context."""
    for what, text in (("--prompt", prompt), ("--system", system)):
        check_text(text, what)
    n = len(llm.chat_tokens(as_messages(prompt, system), add_generation_prompt=True) if chat
            else llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    if n >= llm.n_ctx():
        raise SteerError(f"the prompt has {n} tokens and the context only {llm.n_ctx()}: raise --ctx or shorten it")
    if chat:
        r = llm.create_chat_completion(messages=as_messages(prompt, system), max_tokens=max_tokens,
                                       temperature=temperature, seed=seed)
        return r["choices"][0]["message"]["content"] or ""
    r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return r["choices"][0]["text"]

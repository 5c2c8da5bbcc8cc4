"""Generation of many answers, each under its own profile: the one function that every
evaluation, tuning and audit run generates through.

Today it groups the jobs by profile and decodes them one after another under that profile;
batched decoding with one profile per sequence can replace the body without changing a
caller."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .profile import Profile


@dataclass
class GenJob:
    messages: list[dict]
    profile: Profile | None
    seed: int
    temperature: float
    max_tokens: int


def generate_batch(llm, jobs: list[GenJob], on_done: Callable[[int], None] | None = None) -> list[str]:
    """The reply text of every job, in order. on_done(n) after each n finished jobs."""
    out: list[str | None] = [None] * len(jobs)
    order: dict[int, list[int]] = {}
    profiles: dict[int, Profile | None] = {}
    for i, j in enumerate(jobs):
        order.setdefault(id(j.profile), []).append(i)
        profiles[id(j.profile)] = j.profile
    with llm.lock:
        for key, idx in order.items():
            with llm.steering(profiles[key]):
                for i in idx:
                    j = jobs[i]
                    r = llm.create_chat_completion(messages=j.messages, max_tokens=j.max_tokens,
                                                   temperature=j.temperature, seed=j.seed)
                    out[i] = (r["choices"][0]["message"]["content"] or "").strip()
                    if on_done is not None:
                        on_done(1)
    return out  # type: ignore[return-value]

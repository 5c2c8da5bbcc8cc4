"""The interactive chat of `steer-gguf chat`: a session that survives its user.

A long conversation is trimmed (oldest turns first, the user told once) instead of
overflowing the context; a line that cannot fit, is not UTF-8, or names a bad profile is
refused with one line and the conversation goes on. Started with a profiles directory, the
chat names profiles as the server does (registry.py): `/profile NAME` as well as a path.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from ..errors import SteerError, printable
from ..profile import with_topk
from ..serve.registry import Profiles, load_profiles, warn_excluded

HELP = "/profile PATH|off, /topk K|off, /compare, /quit"
HELP_NAMED = "/profile NAME|PATH|off, /topk K|off, /compare, /quit"


class ChatSession:
    def __init__(self, llm, system: str | None, max_tokens: int, temperature: float, seed: int,
                 out: Callable[..., None], err: Callable[[str], None], profiles: Profiles | None = None,
                 topk: int | None = None):
        self.llm = llm
        self.topk = topk  # /topk K: kept across /profile switches
        # without a directory the registry holds only "none": every other argument is a path
        self.profiles = profiles or Profiles()
        self.help = HELP if self.profiles.directory is None else HELP_NAMED
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.gen = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        self.out, self.err = out, err
        self.last_prompt: str | None = None
        self.told_trimming = False

    # ---- fitting the context -------------------------------------------------------------
    def _budget(self) -> int:
        """Prompt tokens allowed: the context minus room for the answer."""
        n_ctx = self.llm.n_ctx()
        return n_ctx - min(self.gen["max_tokens"], n_ctx // 2)

    def _n_tokens(self, messages: list[dict]) -> int:
        return len(self.llm.chat_tokens(messages, add_generation_prompt=True))

    def fit(self, turns: list[dict], line: str) -> list[dict] | None:
        """The conversation to send for `line`: as many of the latest `turns` as fit with it
        (whole user/assistant pairs). None when the line does not fit even alone."""
        ask = [{"role": "user", "content": line}]
        if self._n_tokens(self.system + ask) > self._budget():
            return None
        kept = list(turns)
        while kept and self._n_tokens(self.system + kept + ask) > self._budget():
            kept = kept[2:]  # the oldest user message and its answer
        if len(kept) < len(turns) and not self.told_trimming:
            self.err("note: the conversation no longer fits the context; the oldest turns are left out "
                     "from now on (raise --ctx to keep more)")
            self.told_trimming = True
        return kept + ask

    # ---- commands ------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line.startswith("/profile"):
            self._profile(line[len("/profile"):].strip())
        elif line.startswith("/topk"):
            self._topk(line[len("/topk"):].strip())
        elif line == "/compare":
            self._compare()
        elif line.startswith("/"):
            self.out(f"unknown command: {self.help}")
        else:
            self._say(line)
        return True

    def _profile(self, arg: str) -> None:
        if not arg:
            self.out("usage: " + self.help.split(",")[0])
            return
        try:
            self.llm.set_profile(with_topk(None if arg == "off" else self.profiles.pick(arg), self.topk, self.llm.info))
        except SteerError as e:
            self.err(f"error: {e}")
            return
        self.out(f"profile: {profile_name(self.llm)}")

    def _topk(self, arg: str) -> None:
        """/topk K: K experts per token in every MoE layer, under whichever profile is in force;
        /topk off: the model's own k."""
        if arg != "off" and not (arg.isascii() and arg.isdigit() and int(arg) >= 1):
            self.err("usage: /topk K|off (K: experts per token, at least 1)")
            return
        k = None if arg == "off" else int(arg)
        cur = self.llm.profile
        plain = None if cur is None else dataclasses.replace(cur, topk=None)
        try:
            self.llm.set_profile(with_topk(plain, k, self.llm.info))
        except SteerError as e:
            self.err(f"error: {e}")
            return
        self.topk = k
        what = f"the model's k={self.llm.info.n_expert_used}" if k is None else str(k)
        self.out(f"experts per token: {what}")

    def _say(self, line: str) -> None:
        msgs = self.fit(self.turns, line)
        if msgs is None:
            self.err(f"error: that line does not fit the context ({self.llm.n_ctx()} tokens, with room for "
                     f"the answer): shorten it or raise --ctx")
            return
        parts: list[str] = []
        try:
            for chunk in self.llm.create_chat_completion(messages=self.system + msgs, stream=True, **self.gen):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                parts.append(piece)
                self.out(piece, nl=False)
        except KeyboardInterrupt:
            self.out()
            self.err("interrupted: answer dropped")
            return
        except (SteerError, ValueError) as e:
            self.out()
            self.err(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return
        self.out()
        self.turns = msgs + [{"role": "assistant", "content": "".join(parts)}]
        self.last_prompt = line

    def _compare(self) -> None:
        if self.last_prompt is None:
            self.out("nothing to compare yet: ask something first")
            return
        msgs = self.fit(self.turns[:-2], self.last_prompt)
        if msgs is None:
            self.err("error: the last prompt no longer fits the context")
            return
        current = self.llm.profile
        answers = []
        try:
            for p in (None, current):
                with self.llm.steering(p):
                    r = self.llm.create_chat_completion(messages=self.system + msgs, **self.gen)
                answers.append(r["choices"][0]["message"]["content"] or "")
        except (SteerError, ValueError) as e:
            self.err(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return
        self.out(f"--- unsteered\n{answers[0]}\n--- steered ({profile_name(self.llm)})\n{answers[1]}")


def chat_profiles(llm, profiles_dir: str, default: str | None, force: bool = False) -> Profiles:
    """The directory's profiles, checked against the model, with `default` (a name there, a
    file, or none: as `serve --profile`) in force."""
    ps = load_profiles(llm.info, profiles_dir, default, force=force)
    warn_excluded(ps)
    llm.set_profile(ps.usable[ps.default])
    return ps


def profile_name(llm) -> str:
    return printable(llm.profile.name) if llm.profile else "none"


def read_line(prompt: str = "> ") -> str | None:
    """One line from the terminal or a pipe; None at end of input. Bytes that are not UTF-8
    come back as lone surrogates (surrogateescape) for the caller to refuse, instead of
    an exception that would end the session."""
    if hasattr(sys.stdin, "reconfigure") and sys.stdin.errors != "surrogateescape":
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        return input(prompt)
    except EOFError:
        return None


def run_chat(session: ChatSession, model_name: str) -> None:
    session.out(f"steer-gguf chat: {model_name}, profile: {profile_name(session.llm)}. {session.help}")
    while True:
        line = read_line()
        if line is None:
            session.out()
            return
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            session.err("error: that line is not UTF-8 text; ignored")
            continue
        if not session.handle(line):
            return

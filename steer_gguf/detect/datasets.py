"""Contrasting pair datasets (JSONL) and locating a pair's target span in a tokenized
conversation.

A pair is two conversations that differ in one behavior: `_0` shows behavior 1 (e.g. a
refusal), `_1` behavior 2 (e.g. compliance). Two line shapes are accepted:

- SteerMoE's: {"messages_0": [...], "messages_1": [...],
               "messages_0_target": "...", "messages_1_target": "..."}
  (targets optional: default to the last message of each conversation, which must then be
  the assistant's);
- compact: {"prompt": "...", "response_0": "...", "response_1": "...", "system": "..."}
  (system optional) -> [system?, user prompt, assistant response_i], target = response_i.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import SteerError
from ..fileio import DATA_DIR, MAX_DATASET_BYTES, decode_text, parse_json, read_bytes, read_json

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = DATA_DIR / "pairs"

Message = dict[str, str]


@dataclass
class Pair:
    messages_0: list[Message]
    messages_1: list[Message]
    target_0: str
    target_1: str
    line: int  # 1-based line in the source file, for error messages downstream


@dataclass
class PairSet:
    pairs: list[Pair]
    source: str  # the spec as given ("builtin:safety" or a path): goes into provenance
    skipped: list[str] = field(default_factory=list)  # one "FILE:LINE: reason" per skipped line

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)


# ---- locating files ------------------------------------------------------------------------

def builtin_names() -> list[str]:
    """Names usable as `builtin:NAME`."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def resolve(spec: str | os.PathLike) -> str:
    """The file a dataset spec names: a path, or `builtin:NAME`."""
    spec = os.fspath(spec)
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = spec[len(BUILTIN_PREFIX):]
    names = builtin_names()
    # the name becomes part of a path: refuse anything that could leave the data folder
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name not in names:
        raise SteerError(f"{spec}: unknown built-in dataset (available: {', '.join(names) or 'none'})")
    return str(BUILTIN_DIR / f"{name}.jsonl")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; a final newline does not make an extra empty line."""
    text = decode_text(read_bytes(path, "file", MAX_DATASET_BYTES), path)
    # split on \n only: str.splitlines would also split on U+2028 etc. inside JSON strings
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    for i, raw in enumerate(parts, start=1):
        yield i, raw.rstrip("\r")


def _json_object(raw: str, where: str) -> dict:
    if not raw.strip():
        raise SteerError(f"{where}: empty line")
    obj = parse_json(raw, where, one_line=True)
    if not isinstance(obj, dict):
        raise SteerError(f"{where}: not a JSON object (got {type(obj).__name__})")
    return obj


# ---- field checks --------------------------------------------------------------------------

def _messages(obj: dict, key: str, where: str) -> list[Message]:
    if key not in obj:
        raise SteerError(f"{where}: missing field '{key}'")
    v = obj[key]
    if not isinstance(v, list):
        raise SteerError(f"{where}: {key}: must be a list of {{\"role\", \"content\"}} messages, "
                         f"got {type(v).__name__}")
    if not v:
        raise SteerError(f"{where}: {key}: empty conversation")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise SteerError(f"{where}: {key}[{i}]: must be an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        for f in ("role", "content"):
            if f not in m:
                raise SteerError(f"{where}: {key}[{i}]: missing field '{f}'")
            if not isinstance(m[f], str):
                raise SteerError(f"{where}: {key}[{i}].{f}: must be a string, got {type(m[f]).__name__}")
        if not m["role"]:
            raise SteerError(f"{where}: {key}[{i}].role: empty")
        # extra fields (name, tool_calls...) are dropped: chat templates only need these two
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _string(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise SteerError(f"{where}: missing field '{key}'")
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise SteerError(f"{where}: {key}: must be a string, got {type(v).__name__}")
    return v


def _target(obj: dict, conv: str, messages: list[Message], where: str) -> str:
    key = f"{conv}_target"
    t = _string(obj, key, where, required=False)
    if t is None:
        last = messages[-1]
        if last["role"] != "assistant":
            raise SteerError(f"{where}: {conv}: last message is from {last['role']!r}, not the assistant, "
                             f"and no {key} is given")
        t = last["content"]
        if not t.strip():
            raise SteerError(f"{where}: {conv}: empty target (the last assistant message is empty)")
        return t
    if not t.strip():
        raise SteerError(f"{where}: {key}: empty target")
    return t


_PAIR_KEYS_STEERMOE = ("messages_0", "messages_1")
_PAIR_KEYS_COMPACT = ("response_0", "response_1")


def _is_pair_line(obj: dict) -> bool:
    return any(k in obj for k in _PAIR_KEYS_STEERMOE + _PAIR_KEYS_COMPACT)


def _compact_conversation(obj: dict, response_key: str | None, where: str) -> list[Message]:
    prompt = _string(obj, "prompt", where)
    if not prompt.strip():
        raise SteerError(f"{where}: prompt: empty")
    system = _string(obj, "system", where, required=False)
    msgs: list[Message] = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    if response_key is not None:
        msgs.append({"role": "assistant", "content": _string(obj, response_key, where)})
    return msgs


def parse_pair(obj: Any, where: str, line: int) -> Pair:
    """One pair from a decoded JSON line; `where` ("FILE:LINE") prefixes every error."""
    if not isinstance(obj, dict):
        raise SteerError(f"{where}: not a JSON object (got {type(obj).__name__})")
    if any(k in obj for k in _PAIR_KEYS_STEERMOE):
        m0 = _messages(obj, "messages_0", where)
        m1 = _messages(obj, "messages_1", where)
        return Pair(m0, m1, _target(obj, "messages_0", m0, where), _target(obj, "messages_1", m1, where), line)
    if any(k in obj for k in ("prompt",) + _PAIR_KEYS_COMPACT):
        m0 = _compact_conversation(obj, "response_0", where)
        m1 = _compact_conversation(obj, "response_1", where)
        for key, m in (("response_0", m0), ("response_1", m1)):
            if not m[-1]["content"].strip():
                raise SteerError(f"{where}: {key}: empty target")
        return Pair(m0, m1, m0[-1]["content"], m1[-1]["content"], line)
    raise SteerError(f"{where}: missing field: a pair needs 'messages_0' and 'messages_1', "
                     f"or 'prompt', 'response_0' and 'response_1'")


# ---- loaders -------------------------------------------------------------------------------

def load_pairs(spec: str | os.PathLike, skip_bad: bool = False, max_pairs: int | None = None) -> PairSet:
    """Read a pair dataset (a JSONL path or `builtin:NAME`). A bad line raises SteerError
    ("FILE:LINE: reason") unless skip_bad, which records it in `skipped` instead. With
    max_pairs, reading stops after that many good pairs (later lines are not checked)."""
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise SteerError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    source = os.fspath(spec)
    path = resolve(source)
    pairs: list[Pair] = []
    skipped: list[str] = []
    for line, raw in _lines(path):
        where = f"{path}:{line}"
        try:
            pairs.append(parse_pair(_json_object(raw, where), where, line))
        except SteerError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    if not pairs:
        extra = f" ({len(skipped)} bad lines skipped)" if skipped else ""
        raise SteerError(f"{path}: no pairs in the file{extra}")
    return PairSet(pairs, source, skipped)


def load_prompts(spec: str | os.PathLike) -> list[list[Message]]:
    """Conversations for routing statistics. Each JSONL line is {"prompt": ..., "system"?: ...},
    {"messages": [...]}, or a pair line (both conversations are used)."""
    path = resolve(os.fspath(spec))
    convs: list[list[Message]] = []
    for line, raw in _lines(path):
        where = f"{path}:{line}"
        obj = _json_object(raw, where)
        if _is_pair_line(obj):
            p = parse_pair(obj, where, line)
            convs += [p.messages_0, p.messages_1]
        elif "messages" in obj:
            convs.append(_messages(obj, "messages", where))
        elif "prompt" in obj:
            convs.append(_compact_conversation(obj, None, where))
        else:
            raise SteerError(f"{where}: missing field: a prompt line needs 'prompt' or 'messages' "
                             f"(or the fields of a pair)")
    if not convs:
        raise SteerError(f"{path}: no prompts in the file")
    return convs


def read_messages(path: str) -> list[Message]:
    """One conversation to trace (`trace --messages`): a JSON list of messages, or an object
    with a "messages" list."""
    data = read_json(path)
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list) or not data:
        raise SteerError(f"{path}: expected a non-empty list of messages")
    for i, m in enumerate(data):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SteerError(f"{path}: messages[{i}] must be an object with string 'role' and 'content'")
    return data


# ---- target spans --------------------------------------------------------------------------

def locate_target(tokens: list[int], target_tokens_variants: list[list[int]]) -> tuple[int, int] | None:
    """[start, end) of the last occurrence in `tokens` of any variant of the target's
    tokenization. Variants exist because BPE splits a string differently in context
    (e.g. with a leading space). The match that ends last wins; among matches ending at
    the same token, the longest (a variant with an extra leading token covers more of the
    same occurrence). None when no variant occurs."""
    best: tuple[int, int] | None = None
    n = len(tokens)
    for v in target_tokens_variants:
        m = len(v)
        if m == 0 or m > n:
            continue
        v = list(v)
        first = v[0]
        # scan from the end: the first hit is this variant's last occurrence
        for s in range(n - m, -1, -1):
            if tokens[s] == first and tokens[s:s + m] == v:
                e = s + m
                if best is None or e > best[1] or (e == best[1] and s < best[0]):
                    best = (s, e)
                break
    return best


def locate_target_text(rendered: str, target: str, offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Token range [start, end) covering the last occurrence of `target` in `rendered`,
    given each token's (start, end) character offsets in `rendered`. A token counts when it
    overlaps the target's characters by at least one; tokens of zero width between two such
    tokens fall inside the range. If the exact target does not occur, its whitespace-stripped
    form is tried (chat templates often strip message content). None when neither occurs or
    no token overlaps it."""
    if not target:
        return None
    at = rendered.rfind(target)
    length = len(target)
    if at < 0:
        stripped = target.strip()
        if not stripped:
            return None
        at = rendered.rfind(stripped)
        length = len(stripped)
        if at < 0:
            return None
    cs, ce = at, at + length
    first = last = -1
    for i, (s, e) in enumerate(offsets):
        if s < ce and e > cs:
            if first < 0 or i < first:
                first = i
            if i > last:
                last = i
    if first < 0:
        return None
    return first, last + 1

"""Held-out evaluation sets (JSONL): the prompts a profile is judged on.

One item a line:

    {"prompt": "...", "id": "q1", "group": "harmful", "system": "...",
     "answer_0": "...", "answer_1": "..."}

- `prompt` (a user message) or `messages` (a chat, ending with a user message), required;
- `id`, optional (default: the line number); `system`, optional, with `prompt` only;
- `group`, optional (default "main"): items are rated per group; the group of the first item
  is the primary one, the others are reported beside it (safety's `benign` group measures
  over-refusal);
- `answer_0` / `answer_1`: what a behavior-1 / behavior-2 answer says (the faithfulness judge
  needs them; a file whose every item has them can be judged without --behavior).

Built-in sets (`builtin:NAME`, made by scripts/make_evalsets.py) are disjoint from the
detection pairs of the same name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import SteerError
from ..fileio import DATA_DIR, MAX_DATASET_BYTES, decode_text, parse_json, read_bytes

BUILTIN_DIR = DATA_DIR / "eval"
BUILTIN_PREFIX = "builtin:"


@dataclass
class EvalItem:
    id: str
    messages: list[dict]
    group: str = "main"
    answer_0: str | None = None
    answer_1: str | None = None

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class EvalSet:
    items: list[EvalItem]
    source: str
    groups: list[str] = field(default_factory=list)  # in order of first appearance; [0] is primary

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, group: str | None = None, per_group: int | None = None) -> "EvalSet":
        """The items of one group (None: every group), at most `per_group` of each, in order."""
        groups = self.groups if group is None else [group]
        items = [it for g in groups for it in [x for x in self.items if x.group == g][:per_group]]
        source = self.source if group is None else f"{self.source} (group {group})"
        return EvalSet(items, source, groups)

    @property
    def has_answers(self) -> bool:
        return bool(self.items) and all(i.answer_0 and i.answer_1 for i in self.items)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl")) if BUILTIN_DIR.is_dir() else []


def resolve(spec: str | os.PathLike) -> str:
    spec = os.fspath(spec)
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = spec[len(BUILTIN_PREFIX):]
    if name not in builtin_names():
        raise SteerError(f"{spec}: unknown built-in eval set (available: {', '.join(builtin_names()) or 'none'})")
    return str(BUILTIN_DIR / f"{name}.jsonl")


def normalize(text: str) -> str:
    """Case and whitespace folded: how held-out prompts are compared with detection pairs."""
    return re.sub(r"\s+", " ", text).strip().lower()


def load_eval_set(spec: str | os.PathLike, max_items: int | None = None) -> EvalSet:
    spec = os.fspath(spec)
    path = resolve(spec)
    text = decode_text(read_bytes(path, "eval set", MAX_DATASET_BYTES), path)
    items: list[EvalItem] = []
    groups: list[str] = []
    ids: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = _parse_line(path, n, line)
        if item.id in ids:
            raise SteerError(f"{path}:{n}: id {item.id!r} already used on line {ids[item.id]}")
        ids[item.id] = n
        if item.group not in groups:
            groups.append(item.group)
        items.append(item)
        if max_items is not None and len(items) >= max_items:
            break
    if not items:
        raise SteerError(f"{path}: no items")
    return EvalSet(items, spec, groups)


def _parse_line(path: str, n: int, line: str) -> EvalItem:
    where = f"{path}:{n}"
    d = parse_json(line, where)  # also refuses deep nesting and lone surrogates
    if not isinstance(d, dict):
        raise SteerError(f"{where}: expected a JSON object")

    def text_field(key: str, required: bool = False) -> str | None:
        v = d.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str) or not v.strip():
            raise SteerError(f"{where}: '{key}' must be a non-empty string")
        return v

    if ("prompt" in d) == ("messages" in d):
        raise SteerError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if "prompt" in d:
        system = text_field("system")
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": text_field("prompt", True)}]
    else:
        if "system" in d:
            raise SteerError(f"{where}: 'system' goes with 'prompt'; put it into 'messages'")
        m = d["messages"]
        if not isinstance(m, list) or not m:
            raise SteerError(f"{where}: 'messages' must be a non-empty list")
        messages = []
        for i, msg in enumerate(m):
            if not (isinstance(msg, dict) and msg.get("role") in ("system", "user", "assistant")
                    and isinstance(msg.get("content"), str)):
                raise SteerError(f"{where}: messages[{i}] must be an object with a role (system, user, "
                                 f"assistant) and string content")
            messages.append({"role": msg["role"], "content": msg["content"]})
        if messages[-1]["role"] != "user":
            raise SteerError(f"{where}: the last message must be the user's (the model answers it)")
    item_id = d.get("id", str(n))
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    if not isinstance(item_id, str) or not item_id:
        raise SteerError(f"{where}: 'id' must be a non-empty string or an integer")
    group = d.get("group", "main")
    if not isinstance(group, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", group):
        raise SteerError(f"{where}: 'group' must be a short name (letters, digits, _ . -)")
    a0, a1 = text_field("answer_0"), text_field("answer_1")
    if (a0 is None) != (a1 is None):
        raise SteerError(f"{where}: give both 'answer_0' and 'answer_1', or neither")
    return EvalItem(item_id, messages, group, a0, a1)


"""Pair datasets: both line shapes, target defaults, built-ins, every error path, spans."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import pytest

from steer_gguf.detect.datasets import (BUILTIN_DIR, Pair, builtin_names, load_pairs, load_prompts, locate_target,
                                 locate_target_text)
from steer_gguf.errors import SteerError

REPO = pathlib.Path(__file__).resolve().parent.parent


def write(tmp_path, lines, name="pairs.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return str(p)


def conv(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


STEERMOE = {"messages_0": conv("hi", "No."), "messages_1": conv("hi", "Yes."),
            "messages_0_target": "No", "messages_1_target": "Yes"}
COMPACT = {"prompt": "Q?", "response_0": "A0", "response_1": "A1"}


# ---- shapes and defaults --------------------------------------------------------------------

def test_steermoe_shape_with_targets(tmp_path):
    ps = load_pairs(write(tmp_path, [STEERMOE]))
    (p,) = ps.pairs
    assert p.messages_0 == conv("hi", "No.") and p.messages_1 == conv("hi", "Yes.")
    assert (p.target_0, p.target_1, p.line) == ("No", "Yes", 1)
    assert ps.skipped == []


def test_steermoe_targets_default_to_last_assistant_message(tmp_path):
    line = {"messages_0": conv("q", "refuse"), "messages_1": conv("q", "comply")}
    (p,) = load_pairs(write(tmp_path, [line])).pairs
    assert (p.target_0, p.target_1) == ("refuse", "comply")


def test_steermoe_extra_message_fields_dropped(tmp_path):
    m = [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "r"}]
    (p,) = load_pairs(write(tmp_path, [{"messages_0": m, "messages_1": m}])).pairs
    assert p.messages_0[0] == {"role": "user", "content": "q"}


def test_compact_shape(tmp_path):
    (p,) = load_pairs(write(tmp_path, [COMPACT])).pairs
    assert p.messages_0 == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A0"}]
    assert p.messages_1 == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A1"}]
    assert (p.target_0, p.target_1) == ("A0", "A1")


def test_compact_with_system(tmp_path):
    (p,) = load_pairs(write(tmp_path, [dict(COMPACT, system="Be brief.")])).pairs
    assert p.messages_0[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in p.messages_1] == ["system", "user", "assistant"]


def test_line_numbers_and_source(tmp_path):
    path = write(tmp_path, [COMPACT, STEERMOE, COMPACT])
    ps = load_pairs(path)
    assert [p.line for p in ps] == [1, 2, 3]
    assert ps.source == path and len(ps) == 3


def test_max_pairs(tmp_path):
    path = write(tmp_path, [COMPACT, COMPACT, COMPACT, "not json"])
    ps = load_pairs(path, max_pairs=2)
    assert len(ps) == 2  # stops before the bad line
    with pytest.raises(SteerError, match="max_pairs"):
        load_pairs(path, max_pairs=0)


def test_crlf_and_bom(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(COMPACT).encode() + b"\r\n" + json.dumps(COMPACT).encode() + b"\r\n")
    assert len(load_pairs(str(p))) == 2


# ---- built-ins --------------------------------------------------------------------------------

EXPECTED_MIN = {"safety": 300, "faithfulness": 300, "digits-words": 100, "digits-words-heldout": 40}


def test_builtin_names():
    assert set(EXPECTED_MIN) <= set(builtin_names())


@pytest.mark.parametrize("name", sorted(EXPECTED_MIN))
def test_builtin_counts_and_shape(name):
    ps = load_pairs(f"builtin:{name}")
    path = BUILTIN_DIR / f"{name}.jsonl"
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    assert len(ps) == n_lines >= EXPECTED_MIN[name]
    assert ps.source == f"builtin:{name}"
    assert path.stat().st_size < 300 * 1024
    prompts = set()
    for p in ps:
        assert p.target_0 != p.target_1
        assert p.messages_0[:-1] == p.messages_1[:-1]  # same prompt, only the reply differs
        prompts.add(p.messages_0[-2]["content"])
    assert len(prompts) == len(ps)  # no duplicate prompts


def test_builtin_readme_counts_match():
    text = (BUILTIN_DIR / "README.md").read_text(encoding="utf-8")
    for name in EXPECTED_MIN:
        m = re.search(rf"\| `{re.escape(name)}` \| (\d+) \|", text)
        assert m, name
        assert int(m.group(1)) == len(load_pairs(f"builtin:{name}"))


def test_safety_compliance_is_only_an_opening():
    for p in load_pairs("builtin:safety"):
        assert p.target_1.count(".") + p.target_1.count("!") <= 2
        assert not re.search(r"\b(step|first|1)\s*[:.)]", p.target_1, re.I)
        assert re.match(r"(Sure|Of course|Absolutely|Certainly)", p.target_1)
        assert re.search(r"\b(can't|won't)\b", p.target_0)


def _word_diff(a: str, b: str) -> tuple[str, str]:
    """The differing middle of two sentences, word-wise."""
    wa, wb = a.rstrip(".").split(), b.rstrip(".").split()
    while wa and wb and wa[0] == wb[0]:
        wa, wb = wa[1:], wb[1:]
    while wa and wb and wa[-1] == wb[-1]:
        wa, wb = wa[:-1], wb[:-1]
    return " ".join(wa), " ".join(wb)


def test_faithfulness_answers_differ_only_in_the_answer():
    for p in load_pairs("builtin:faithfulness"):
        prompt = p.messages_0[-2]["content"].lower()
        passage_answer, world_answer = _word_diff(p.target_0, p.target_1)
        assert passage_answer and world_answer
        # behavior 1 answers with what the passage states; behavior 2's answer is not in it
        assert re.search(rf"\b{re.escape(passage_answer.lower())}\b", prompt)
        assert not re.search(rf"\b{re.escape(world_answer.lower())}\b", prompt)


def _numbers_in(text: str) -> set[int]:
    return {int(x) for x in re.findall(r"\d+", text)}


def test_digits_words_digits_vs_words():
    for name in ("digits-words", "digits-words-heldout"):
        for p in load_pairs(f"builtin:{name}"):
            assert re.search(r"\d", p.target_0)
            assert not re.search(r"\d", p.target_1)


def test_digits_heldout_is_disjoint():
    main = load_pairs("builtin:digits-words")
    held = load_pairs("builtin:digits-words-heldout")
    answers_main = {max(_numbers_in(p.target_0)) for p in main}
    answers_held = {max(_numbers_in(p.target_0)) for p in held}
    assert not answers_main & answers_held
    prompts_main = {p.messages_0[-2]["content"] for p in main}
    assert not prompts_main & {p.messages_0[-2]["content"] for p in held}


def test_digit_words_match_digits():
    spec = importlib.util.spec_from_file_location("make_pairs", REPO / "scripts" / "make_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # hand-written spellings, independent of the generator's tables
    for n, w in [(0, "zero"), (7, "seven"), (12, "twelve"), (19, "nineteen"), (20, "twenty"), (21, "twenty-one"),
                 (40, "forty"), (99, "ninety-nine"), (105, "one hundred and five"), (300, "three hundred")]:
        assert mod.number_words(n) == w
    # the committed files are exactly what the script generates
    files = mod.build()
    for name, text in files.items():
        assert (BUILTIN_DIR / name).read_text(encoding="utf-8") == text, name


def test_unknown_builtin_lists_available():
    with pytest.raises(SteerError) as e:
        load_pairs("builtin:nope")
    msg = str(e.value)
    assert msg.startswith("builtin:nope: unknown built-in dataset")
    assert "safety" in msg and "digits-words" in msg


def test_builtin_name_cannot_escape_folder():
    with pytest.raises(SteerError, match="unknown built-in"):
        load_pairs("builtin:../pairs/safety")


# ---- errors -----------------------------------------------------------------------------------

BAD_LINES = [
    ("", "empty line"),
    ("   ", "empty line"),
    ("{not json", "bad JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"foo": 1}, "missing field"),
    ({"messages_0": conv("q", "a")}, "missing field 'messages_1'"),
    ({"prompt": "q", "response_0": "a"}, "missing field 'response_1'"),
    ({"response_0": "a", "response_1": "b"}, "missing field 'prompt'"),
    ({"messages_0": "hello", "messages_1": conv("q", "a")}, "messages_0: must be a list"),
    ({"messages_0": [], "messages_1": conv("q", "a")}, "messages_0: empty conversation"),
    ({"messages_0": ["hi"], "messages_1": conv("q", "a")}, r"messages_0\[0\]: must be an object"),
    ({"messages_0": [{"role": "user"}], "messages_1": conv("q", "a")}, r"messages_0\[0\]: missing field 'content'"),
    ({"messages_0": conv("q", "a"), "messages_1": [{"role": "user", "content": 5}]},
     r"messages_1\[0\]\.content: must be a string"),
    ({"messages_0": conv("q", "a"), "messages_1": [{"role": 1, "content": "x"}]},
     r"messages_1\[0\]\.role: must be a string"),
    ({"messages_0": [{"role": "user", "content": "q"}], "messages_1": conv("q", "a")},
     "messages_0: last message is from 'user', not the assistant, and no messages_0_target"),
    ({"messages_0": conv("q", "a"), "messages_1": conv("q", "b"), "messages_1_target": ""},
     "messages_1_target: empty target"),
    ({"messages_0": conv("q", "a"), "messages_1": conv("q", "b"), "messages_0_target": 3},
     "messages_0_target: must be a string"),
    ({"messages_0": conv("q", "  "), "messages_1": conv("q", "b")}, "messages_0: empty target"),
    ({"prompt": "q", "response_0": "", "response_1": "b"}, "response_0: empty target"),
    ({"prompt": "q", "response_0": "a", "response_1": ["b"]}, "response_1: must be a string"),
    ({"prompt": 5, "response_0": "a", "response_1": "b"}, "prompt: must be a string"),
    ({"prompt": "q", "response_0": "a", "response_1": "b", "system": 1}, "system: must be a string"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, bad, reason):
    path = write(tmp_path, [COMPACT, STEERMOE, bad, COMPACT])
    with pytest.raises(SteerError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert re.search(reason, msg), msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_skip_bad_records_and_continues(tmp_path, bad, reason):
    path = write(tmp_path, [COMPACT, bad, STEERMOE])
    ps = load_pairs(path, skip_bad=True)
    assert [p.line for p in ps] == [1, 3]
    assert len(ps.skipped) == 1 and ps.skipped[0].startswith(f"{path}:2: ")
    assert re.search(reason, ps.skipped[0])


def test_skip_bad_all_bad_is_an_error(tmp_path):
    path = write(tmp_path, ["oops", "{}"])
    with pytest.raises(SteerError, match=r"no pairs in the file \(2 bad lines skipped\)"):
        load_pairs(path, skip_bad=True)


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(SteerError, match=f"^{re.escape(str(empty))}: no pairs"):
        load_pairs(str(empty))
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(SteerError, match=f"^{re.escape(missing)}: no such file"):
        load_pairs(missing)
    with pytest.raises(SteerError, match="is a directory"):
        load_pairs(str(tmp_path))


def test_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(json.dumps(COMPACT).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(SteerError, match=rf"^{re.escape(str(p))}:2: not UTF-8"):
        load_pairs(str(p))


def test_trailing_empty_line_is_an_error(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(COMPACT) + "\n\n")
    with pytest.raises(SteerError, match=rf"{re.escape(str(p))}:2: empty line"):
        load_pairs(str(p))


# ---- prompts --------------------------------------------------------------------------------

def test_load_prompts_all_shapes(tmp_path):
    msgs = [{"role": "user", "content": "m"}]
    path = write(tmp_path, [{"prompt": "p"}, {"prompt": "s", "system": "sys"}, {"messages": msgs}, COMPACT, STEERMOE])
    convs = load_prompts(path)
    assert convs[0] == [{"role": "user", "content": "p"}]
    assert convs[1] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "s"}]
    assert convs[2] == msgs
    assert convs[3][-1]["content"] == "A0" and convs[4][-1]["content"] == "A1"
    assert convs[5] == STEERMOE["messages_0"] and convs[6] == STEERMOE["messages_1"]
    assert len(convs) == 7


def test_load_prompts_builtin():
    assert len(load_prompts("builtin:digits-words")) == 2 * len(load_pairs("builtin:digits-words"))


@pytest.mark.parametrize("bad,reason", [("", "empty line"), ({"text": "x"}, "missing field"),
                                        ({"messages": "x"}, "messages: must be a list"),
                                        ({"prompt": ""}, "prompt: empty")])
def test_load_prompts_errors(tmp_path, bad, reason):
    path = write(tmp_path, [{"prompt": "ok"}, bad])
    with pytest.raises(SteerError, match=rf"^{re.escape(path)}:2: .*{reason}"):
        load_prompts(path)


# ---- spans ----------------------------------------------------------------------------------

def test_locate_target_last_occurrence():
    toks = [1, 5, 6, 2, 5, 6, 3]
    assert locate_target(toks, [[5, 6]]) == (4, 6)


def test_locate_target_any_variant_latest_wins():
    toks = [9, 7, 8, 1, 5, 6, 3]
    # variant [7, 8] occurs earlier than [5, 6]: the later one wins regardless of order
    assert locate_target(toks, [[5, 6], [7, 8]]) == (4, 6)
    assert locate_target(toks, [[7, 8], [5, 6]]) == (4, 6)


def test_locate_target_same_end_prefers_longer():
    toks = [1, 2, 4, 5, 6, 3]
    # [5, 6] and [4, 5, 6] are two tokenizations of the same occurrence
    assert locate_target(toks, [[5, 6], [4, 5, 6]]) == (2, 5)


def test_locate_target_not_found_and_degenerate():
    assert locate_target([1, 2, 3], [[4], [2, 1]]) is None
    assert locate_target([1, 2, 3], []) is None
    assert locate_target([1, 2, 3], [[]]) is None
    assert locate_target([1], [[1, 2]]) is None
    assert locate_target([1, 2, 3], [[1, 2, 3]]) == (0, 3)


def _offsets(pieces):
    out, at = [], 0
    for p in pieces:
        out.append((at, at + len(p)))
        at += len(p)
    return out


def test_locate_target_text_last_occurrence():
    pieces = ["<u>", "Say", " yes", "</u>", "<a>", "Yes", ",", " yes", "</a>"]
    rendered = "".join(pieces)
    assert locate_target_text(rendered, " yes", _offsets(pieces)) == (7, 8)


def test_locate_target_text_partial_tokens_are_covered():
    # the target starts inside token 1 and ends inside token 3
    pieces = ["<a>", " Sure", " thing", "!</a>"]
    rendered = "".join(pieces)
    assert locate_target_text(rendered, "Sure thing!", _offsets(pieces)) == (1, 4)


def test_locate_target_text_zero_width_tokens():
    pieces = ["<a>", "", "ab", "", "cd", "", "</a>"]
    rendered = "".join(pieces)
    # zero-width tokens inside the span are included; those at its edges are not
    assert locate_target_text(rendered, "abcd", _offsets(pieces)) == (2, 5)


def test_locate_target_text_stripped_fallback_and_not_found():
    pieces = ["<a>", "Hello", "</a>"]
    rendered = "".join(pieces)
    # the template stripped the content's whitespace
    assert locate_target_text(rendered, "  Hello\n", _offsets(pieces)) == (1, 2)
    assert locate_target_text(rendered, "Bye", _offsets(pieces)) is None
    assert locate_target_text(rendered, "", _offsets(pieces)) is None
    assert locate_target_text(rendered, "Hello", []) is None


def test_pair_is_plain_dataclass():
    p = Pair([], [], "a", "b", 3)
    assert p.line == 3 and p.target_1 == "b"


def test_no_native_import():
    # these modules must work without the patched libllama: tests and the CSV/profile tools
    import subprocess
    import sys
    code = ("import sys, steer_gguf.detect.datasets, steer_gguf.detect.risk; "
            "bad = [m for m in ('llama_cpp', 'steer_gguf._native') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

"""GBNF grammars checked before llama.cpp samples with them.

llama-cpp-python's `LlamaGrammar.from_string` parses nothing: a grammar llama.cpp cannot
parse (a syntax error, an undefined rule, left recursion) only fails at sampling, where the
NULL sampler it gets back goes into the sampler chain and the process dies. llama.cpp's
parser is also recursive, so deep enough nesting overflows the stack before it can fail.
"""
from __future__ import annotations

from .errors import SteerError

# llama.cpp's parser recurses once per nesting level and its left-recursion check once per
# rule in a chain; measured on an 8 MiB thread stack, 6,000 levels and 30,000 chained rules
# parse, 20,000 levels and 100,000 rules crash. These bounds stay far inside that.
MAX_BYTES = 64 * 1024
MAX_DEPTH = 256


def nesting_depth(text: str) -> int:
    """The deepest parenthesis nesting, outside string literals, character classes and comments."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def check_grammar(vocab, grammar: str, root: str = "root") -> None:
    """Raise SteerError unless llama.cpp can build a sampler for `grammar` on this vocabulary."""
    import llama_cpp  # whoever holds a vocab has loaded it on steer-gguf's library

    if not isinstance(grammar, str) or not isinstance(root, str):
        raise SteerError("grammar: must be a string")
    try:
        data, root_data = grammar.encode("utf-8"), root.encode("utf-8")
    except UnicodeEncodeError:
        raise SteerError("grammar: not valid Unicode text (a lone surrogate)") from None
    if len(data) > MAX_BYTES:
        raise SteerError(f"grammar: {len(data)} bytes, more than the {MAX_BYTES} accepted")
    if "\0" in grammar or "\0" in root:
        raise SteerError("grammar: contains a NUL character")
    depth = nesting_depth(grammar)
    if depth > MAX_DEPTH:
        raise SteerError(f"grammar: parentheses nested {depth} deep, more than the {MAX_DEPTH} accepted")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, data, root_data)
    if not sampler:
        raise SteerError(f"grammar: llama.cpp cannot parse it (a syntax error, a rule used but not defined, "
                         f"left recursion, or no rule {root!r})")
    llama_cpp.llama_sampler_free(sampler)

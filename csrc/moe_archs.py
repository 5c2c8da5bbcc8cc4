#!/usr/bin/env python3
"""List the architectures whose llama.cpp graph can route tokens to experts (build_moe_ffn).

    python csrc/moe_archs.py LLAMA_CPP_DIR OUT

Read from the llama.cpp being built, so the list is always that build's: an architecture's
name (llama-arch.cpp) -> its model class (llama-model.cpp's factory) -> the source file that
defines the class's graph, or the class whose graph it borrows (models.h `using graph = ...`).
A class routes when that file calls build_moe_ffn and the class's loader (load_arch_tensors)
can create a router (LLM_TENSOR_FFN_GATE_INP): bert, phi3, lfm2, ... share a graph with a MoE
sibling but load dense layers only. Written one name per line; CMake installs it beside the
package, where model_info refuses a file of an architecture that never routes."""
from __future__ import annotations

import pathlib
import re
import sys


def moe_architectures(llama: pathlib.Path) -> list[str]:
    src = llama / "src"
    names = dict(re.findall(r'\{\s*(LLM_ARCH_\w+)\s*,\s*"([^"]+)"\s*\}', (src / "llama-arch.cpp").read_text()))
    factory = (src / "llama-model.cpp").read_text()
    cls_of: dict[str, str] = {}
    for cases, cls in re.findall(r"((?:case\s+LLM_ARCH_\w+:\s*)+)return new (llama_model_\w+)\s*\(", factory):
        for e in re.findall(r"LLM_ARCH_\w+", cases):
            cls_of[e] = cls
    routes: set[str] = set()
    dense_loader: set[str] = set()
    for f in (src / "models").glob("*.cpp"):
        text = f.read_text()
        if "build_moe_ffn(" in text:
            routes |= set(re.findall(r"(llama_model_\w+)::graph\w*(?:<[^>]*>)?::graph\w*\s*\(", text))
        for cls, body in re.findall(r"void (llama_model_\w+)::load_arch_tensors\b(.*?)\n\}\n", text, flags=re.S):
            if not re.search(r"LLM_TENSOR_FFN_GATE_INP\b", body):
                dense_loader.add(cls)
    header = (src / "models" / "models.h").read_text()
    borrow = dict(re.findall(r"struct (llama_model_\w+)\s*:[^{]*\{(?:(?!\nstruct ).)*?using graph\w*\s*=\s*"
                             r"(llama_model_\w+)::graph", header, flags=re.S))
    for _ in range(len(borrow)):  # a chain of borrowings resolves in at most this many steps
        routes |= {c for c, d in borrow.items() if d in routes}
    if not routes:
        raise SystemExit(f"moe_archs.py: found no graph calling build_moe_ffn under {src}: has llama.cpp's layout changed?")
    return sorted({names[e] for e, c in cls_of.items() if c in routes and c not in dense_loader and e in names})


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.splitlines()[2].strip())
    archs = moe_architectures(pathlib.Path(sys.argv[1]))
    pathlib.Path(sys.argv[2]).write_text("".join(a + "\n" for a in archs))


if __name__ == "__main__":
    main()

"""Apply steer-gguf's anchored edits to a llama.cpp source tree.

Every edit is an (file, anchor, insertion) triple: the anchor must occur exactly once,
so an upstream change that moves code makes the build fail loudly, naming the anchor,
instead of silently steering the wrong place. Re-running on a patched tree is a no-op.
"""
from __future__ import annotations

import pathlib
import sys

MARK = "steer-gguf"

# (relative path, anchor, text, where): where is "before" or "after" the anchor.
EDITS: list[tuple[str, str, str, str]] = [
    # graph params carry the steering table and its generation, so a table change
    # forbids graph reuse (the topology depends on which layers are steered)
    ("src/llama-graph.h",
     "struct llm_graph_params {\n",
     "struct llama_adapter_steer; // steer-gguf\n\n",
     "before"),
    ("src/llama-graph.h",
     "    llm_graph_result * res;\n\n    // return true if the \"other\" params",
     "    const llama_adapter_steer * steer = nullptr; // steer-gguf\n"
     "    uint64_t steer_gen = 0;                       // steer-gguf\n",
     "after_first_line"),
    ("src/llama-graph.h",
     "        if (n_outputs != other.n_outputs) {\n",
     "        if (steer != other.steer || steer_gen != other.steer_gen) { // steer-gguf\n"
     "            return false;\n"
     "        }\n\n",
     "before"),
    ("src/llama-graph.h",
     "    const llm_graph_cb & cb_func;\n\n    llm_graph_result * res;\n",
     "    const llama_adapter_steer * steer; // steer-gguf\n",
     "after"),
    ("src/llama-graph.cpp",
     "    res              (params.res),\n",
     "    steer            (params.steer), // steer-gguf\n",
     "after"),
    # the two places where routing is decided: router logits, and the selection
    # scores when a selection bias / expert groups make them differ from the logits
    ("src/llama-graph.cpp",
     "#include \"llama-graph.h\"\n",
     "#include \"llama-steer-adapter.h\" // steer-gguf\n",
     "after"),
    ("src/llama-graph.cpp",
     "        cb(logits, \"ffn_moe_logits_biased\", il);\n    }\n",
     "\n    if (steer && steer->has_layer(il)) { // steer-gguf\n"
     "        logits = steer->apply_logits(ctx0, logits, il);\n"
     "        cb(logits, \"ffn_moe_logits_steered\", il);\n"
     "    }\n",
     "after"),
    ("src/llama-graph.cpp",
     "    // select experts\n    ggml_tensor * selected_experts = selected_experts_in;\n",
     "    if (steer && steer->has_layer(il) && (exp_probs_b != nullptr || hparams.n_expert_groups > 1 || arch == LLM_ARCH_GROVEMOE)) { // steer-gguf\n"
     "        selection_probs = steer->apply_selection(ctx0, selection_probs, il, hparams.n_expert_groups > 1);\n"
     "        cb(selection_probs, \"ffn_moe_probs_steered\", il);\n"
     "    }\n\n",
     "before"),
    # the context owns the table; graph_params hands it to the graph builder
    ("src/llama-context.h",
     "    llama_adapter_cvec_ptr  cvec;\n",
     "    std::shared_ptr<llama_adapter_steer> steer; // steer-gguf\n"
     "    uint64_t steer_gen = 0;                     // steer-gguf\n",
     "after"),
    ("src/llama-context.h",
     "    bool set_adapter_cvec(\n",
     "    // steer-gguf: defined in llama-steer.cpp\n"
     "    void steer_replace(std::shared_ptr<llama_adapter_steer> s);\n"
     "    void steer_set_eval_callback(ggml_backend_sched_eval_callback cb, void * user_data);\n\n",
     "before"),
    ("src/llama-context.h",
     "struct llama_context {\n",
     "struct llama_adapter_steer; // steer-gguf\n\n",
     "before"),
    ("src/llama-context.cpp",
     "        /*.res         =*/ res,\n    };\n",
     "        /*.res         =*/ res,\n"
     "        /*.steer       =*/ steer.get(), // steer-gguf\n"
     "        /*.steer_gen   =*/ steer_gen,\n    };\n",
     "replace"),
]


def apply(root: pathlib.Path) -> None:
    for rel, anchor, text, where in EDITS:
        path = root / rel
        if not path.is_file():
            sys.exit(f"steer-gguf patch: {path} not found (is this a llama.cpp tree?)")
        src = path.read_text()
        if text in src:
            continue  # already applied
        count = src.count(anchor)
        if count != 1:
            sys.exit(f"steer-gguf patch: anchor {anchor.splitlines()[0].strip()!r} found {count} times "
                     f"in {rel}, expected once: this llama.cpp version is not the one the patch targets")
        if where == "before":
            new = src.replace(anchor, text + anchor)
        elif where == "after":
            new = src.replace(anchor, anchor + text)
        elif where == "after_first_line":
            first, rest = anchor.split("\n", 1)
            new = src.replace(anchor, first + "\n" + text + rest)
        elif where == "replace":
            new = src.replace(anchor, text)
        else:
            raise ValueError(where)
        path.write_text(new)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: patch_llama.py LLAMA_CPP_DIR")
    apply(pathlib.Path(sys.argv[1]))

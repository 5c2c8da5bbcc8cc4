"""Apply steer-gguf's anchored edits to a llama.cpp source tree.

Every edit is an (file, anchor, insertion) triple: the anchor must occur exactly once,
so an upstream change that moves code makes the build fail loudly, naming the anchor,
instead of silently steering the wrong place. Re-running on a patched tree is a no-op.
"""
from __future__ import annotations

import pathlib
import sys

MARK = "steer-gguf"

VK_SETTINGS_BLOCK = (
    "    VkBool32 enable_best_practice = layer_settings;\n"
    "    std::vector<vk::LayerSettingEXT> settings = {\n"
    "        {\n"
    "            \"VK_LAYER_KHRONOS_validation\",\n"
    "            \"validate_best_practices\",\n"
    "            vk::LayerSettingTypeEXT::eBool32,\n"
    "            1,\n"
    "            &enable_best_practice\n"
    "        },\n"
    "    };\n"
    "    vk::LayerSettingsCreateInfoEXT layer_setting_info(settings);\n"
    "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);\n"
)

# (relative path, anchor, text, where): where is "before" or "after" the anchor, "replace" it,
# or inside it: "after_first_line", "after_first_line_2" (its first two), "before_last_line".
EDITS: list[tuple[str, str, str, str]] = [
    # graph params carry the steering table and its generation, so a table change
    # forbids graph reuse (the topology depends on which layers are steered)
    ("src/llama-graph.h",
     "struct llm_graph_params {\n",
     "#include \"llama-steer-adapter.h\" // steer-gguf\n\n",
     "before"),
    ("src/llama-graph.h",
     "    llm_graph_result * res;\n\n    // return true if the \"other\" params",
     "    const llama_adapter_steer * steer = nullptr; // steer-gguf\n"
     "    uint64_t steer_gen = 0;                       // steer-gguf\n"
     "    const llama_steer_route * steer_route = nullptr; // steer-gguf: non-null while the context records routing\n"
     "    int32_t steer_route_flags = 0;                // steer-gguf\n"
     "    int64_t steer_route_nsel = -1;                // steer-gguf: rows of the last layer beyond outputs (llama_steer_sel)\n",
     "after_first_line"),
    ("src/llama-graph.h",
     "        if (n_outputs != other.n_outputs) {\n",
     "        if (steer != other.steer || steer_gen != other.steer_gen || // steer-gguf\n"
     "            steer_route != other.steer_route || steer_route_flags != other.steer_route_flags ||\n"
     "            steer_route_nsel != other.steer_route_nsel) {\n"
     "            return false;\n"
     "        }\n\n",
     "before"),
    ("src/llama-graph.h",
     "    const llm_graph_cb & cb_func;\n\n    llm_graph_result * res;\n",
     "    const llama_adapter_steer * steer; // steer-gguf\n"
     "    mutable llama_steer_graph steer_graph; // steer-gguf: this graph's token -> table inputs\n",
     "after"),
    ("src/llama-graph.cpp",
     "    res              (params.res),\n",
     "    steer            (params.steer), // steer-gguf\n"
     "    steer_graph      {params.res, (int64_t) params.ubatch.n_tokens, (int64_t) params.n_outputs, params.steer_route, params.steer_route_nsel, &params.ubatch}, // steer-gguf\n",
     "after"),
    # Experts per token from the steering table (steer.h, API version 4): the layer is built
    # with K in place of the model's k, so top-k, weight normalisation / softmax-after-top-k,
    # the expert matmuls and the sum all run over K rows, exactly as a model whose
    # expert_used_count is K (and a smaller K reads fewer expert weights). Not where the experts
    # come in fixed (hash routing: selected_experts_in)
    ("src/llama-graph.cpp",
     "    const bool weight_before_ffn = arch == LLM_ARCH_LLAMA4; // for llama4, we apply the sigmoid-ed weights before the FFN\n",
     "    const int64_t steer_k = steer && selected_experts_in == nullptr ? steer->graph_k(steer_graph, il) : 0; // steer-gguf\n"
     "    const bool steer_mixed = steer_k > 0 && steer->graph_mixed(steer_graph, il);\n"
     "    if (steer_k > 0) {\n"
     "        n_expert_used = steer_k;\n"
     "    }\n",
     "after"),
    ("src/llama-graph.cpp",
     "    const uint32_t n_expert_used_il = hparams.n_expert_used(il);\n",
     "    const uint32_t n_expert_used_il = steer_k > 0 ? (uint32_t) steer_k : hparams.n_expert_used(il); // steer-gguf\n",
     "replace"),
    # Tokens of one micro-batch with different K (per-sequence tables): the layer is built with
    # the widest, and each token's weights are cut to its own K (llama-steer.cpp, mix_weights),
    # in place of upstream's softmax-after-top-k and normalisation, which would run over the widest
    ("src/llama-graph.cpp",
     "    ggml_tensor * weights = ggml_get_rows(ctx0, probs, selected_experts); // [1, n_expert_used, n_tokens]\n"
     "    cb(weights, \"ffn_moe_weights\", il);\n",
     "    if (steer_mixed) { // steer-gguf\n"
     "        weights = steer->mix_weights(ctx0, steer_graph, weights, il,\n"
     "            gating_op == LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT, norm_w);\n"
     "        cb(weights, \"ffn_moe_weights_mixed_k\", il);\n"
     "    }\n",
     "after"),
    ("src/llama-graph.cpp",
     "    if (gating_op == LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT) {\n        weights = ggml_reshape_2d(ctx0, weights, n_expert_used, n_tokens);\n",
     "    if (!steer_mixed && gating_op == LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT) { // steer-gguf\n"
     "        weights = ggml_reshape_2d(ctx0, weights, n_expert_used, n_tokens);\n",
     "replace"),
    ("src/llama-graph.cpp",
     "    if (norm_w) {\n        weights = ggml_reshape_2d(ctx0, weights, n_expert_used, n_tokens);\n",
     "    if (!steer_mixed && norm_w) { // steer-gguf\n"
     "        weights = ggml_reshape_2d(ctx0, weights, n_expert_used, n_tokens);\n",
     "replace"),
    # REAP saliency (llama_steer_route_read_norms): each selected expert's output norm, before
    # its weight multiplies it
    ("src/llama-graph.cpp",
     "    if (!weight_before_ffn) {\n        experts = ggml_mul(ctx0, experts, weights);\n",
     "    steer_graph.keep_norms(ctx0, gf, experts, il); // steer-gguf\n\n",
     "before"),
    # the two places where routing is decided: router logits, and the selection
    # scores when a selection bias / expert groups make them differ from the logits
    ("src/llama-graph.cpp",
     "#include \"llama-graph.h\"\n",
     "#include \"llama-steer-adapter.h\" // steer-gguf\n",
     "after"),
    ("src/llama-graph.cpp",
     "        cb(logits, \"ffn_moe_logits_biased\", il);\n    }\n",
     "\n    if (steer && steer->has_layer(il)) { // steer-gguf\n"
     "        logits = steer->apply_logits(ctx0, steer_graph, logits, il);\n"
     "        cb(logits, \"ffn_moe_logits_steered\", il);\n"
     "    }\n",
     "after"),
    # Selection bias without expert groups (sigmoid or softmax gating, scores in [0, 1]): the
    # table steers the bias instead of the scores, so the graph keeps the gating -> add -> top-k
    # pattern that the fused top-k-MoE kernels (CUDA, Vulkan, Metal) match; an activated expert's
    # bias becomes max(bias) + 2, a deactivated one's min(bias) - 2, which decides selection
    # exactly as steering the scores would (llama-steer.cpp, selection_bias)
    ("src/llama-graph.cpp",
     "    ggml_tensor * selection_probs = probs;\n",
     "    bool steer_sel_done = false; // steer-gguf\n",
     "before"),
    ("src/llama-graph.cpp",
     "        selection_probs = ggml_add(ctx0, probs, exp_probs_b);\n",
     "        ggml_tensor * steer_b = steer && hparams.n_expert_groups <= 1 && arch != LLM_ARCH_GROVEMOE && // steer-gguf\n"
     "            (gating_op == LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX || gating_op == LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID)\n"
     "            ? steer->selection_bias(il, exp_probs_b) : nullptr;\n"
     "        steer_sel_done = steer_b != nullptr;\n"
     "        selection_probs = ggml_add(ctx0, probs, steer_b ? steer_b : exp_probs_b);\n",
     "replace"),
    ("src/llama-graph.cpp",
     "    // select experts\n    ggml_tensor * selected_experts = selected_experts_in;\n",
     "    if (steer && !steer_sel_done && steer->has_layer(il) && (exp_probs_b != nullptr || hparams.n_expert_groups > 1 || arch == LLM_ARCH_GROVEMOE)) { // steer-gguf\n"
     "        selection_probs = steer->apply_selection(ctx0, steer_graph, selection_probs, il, hparams.n_expert_groups > 1);\n"
     "        cb(selection_probs, \"ffn_moe_probs_steered\", il);\n"
     "    }\n\n",
     "before"),
    # Routing recorded by the graph (steer.h, API version 3): the top-k as the router chose it
    # (GroveMoE divides it afterwards; the eval-callback recorder sees it before) and the final
    # weights become graph outputs, kept only once the weights are in the graph, so the nodes
    # that backends fuse into one top-k-MoE kernel stay consecutive
    ("src/llama-graph.cpp",
     "    cb(selected_experts, \"ffn_moe_topk\", il);\n",
     "    ggml_tensor * steer_topk = selected_experts; // steer-gguf\n",
     "after"),
    ("src/llama-graph.cpp",
     "    //call early so that topk-moe can be used\n    ggml_build_forward_expand(gf, weights);\n",
     "    if (steer_graph.route) { // steer-gguf\n"
     "        steer_graph.keep_route(ctx0, gf, steer_topk, weights, il);\n"
     "    }\n"
     "    ggml_tensor * steer_rows = steer_graph.route && selected_experts == steer_topk && il == (int) hparams.n_layer() - 1\n"
     "        ? steer_graph.expert_rows(ctx0, cur) : nullptr; // steer-gguf\n"
     "    if (steer_rows && steer_rows->ne[0] == 0) {\n"
     "        return ggml_scale(ctx0, cur, 0.0f); // steer-gguf: routed rows and no output: no expert is read\n"
     "    }\n"
     "    if (steer_rows) { // steer-gguf\n"
     "        cur = ggml_get_rows(ctx0, cur, steer_rows);\n"
     "        selected_experts = ggml_get_rows(ctx0, selected_experts, steer_rows);\n"
     "        weights = ggml_reshape_3d(ctx0, ggml_get_rows(ctx0, ggml_reshape_2d(ctx0, weights, n_expert_used, n_tokens),\n"
     "            steer_rows), 1, n_expert_used, steer_rows->ne[0]);\n"
     "    }\n",
     "after"),
    # ... so the expert part counts its rows from its input, not from n_tokens
    ("src/llama-graph.cpp",
     "    cur = ggml_reshape_3d(ctx0, cur, n_embd, 1, n_tokens);\n",
     "    cur = ggml_reshape_3d(ctx0, cur, n_embd, 1, cur->ne[1]); // steer-gguf: n_tokens, or the output rows\n",
     "replace"),
    ("src/llama-graph.cpp",
     "ggml_repeat_4d(ctx0, cur, n_embd, n_expert_used, n_tokens, 1)",
     "ggml_repeat_4d(ctx0, cur, n_embd, n_expert_used, cur->ne[2], 1) /* steer-gguf */",
     "replace"),
    ("src/llama-graph.cpp",
     "cur_experts[i] = ggml_view_2d(ctx0, experts, n_embd, n_tokens, experts->nb[2], i*experts->nb[1]);",
     "cur_experts[i] = ggml_view_2d(ctx0, experts, n_embd, experts->ne[2], experts->nb[2], i*experts->nb[1]); // steer-gguf",
     "replace"),
    ("src/llama-graph.cpp",
     "    cb(moe_out, \"ffn_moe_out\", il);\n\n    return moe_out;\n",
     "    if (steer_rows) { // steer-gguf: back to every row the layer computes (the routed ones unread)\n"
     "        moe_out = ggml_get_rows(ctx0, moe_out, steer_graph.expert_back(ctx0));\n"
     "    }\n\n",
     "before_last_line"),
    # Routed rows that need no logits (llama_steer_route_rows): the last layer computes them
    # with the outputs (out_ids lists both), and the output norm's input is cut to the outputs,
    # so the output head runs for output rows alone; an architecture whose graph reaches its
    # logits otherwise gets them cut after the head (steer_graph.finish), never wrong rows
    ("src/llama-graph.cpp",
     "ggml_tensor * llm_graph_context::build_inp_out_ids() const {\n",
     "    if (steer_graph.n_sel >= 0) { // steer-gguf\n"
     "        return steer_graph.inp_sel_rows(ctx0);\n"
     "    }\n",
     "after"),
    ("src/llama-graph.cpp",
     "       llm_norm_type   type,\n                 int   il) const {\n    switch (type) {\n",
     "    if (steer_graph.n_sel >= 0) { // steer-gguf\n"
     "        cur = steer_graph.cut_to_outputs(ctx0, cur, mw, il);\n"
     "    }\n",
     "after_first_line_2"),
    ("src/llama-model.cpp",
     "    // add on pooling layer\n    llm->build_pooling(",
     "    llm->steer_graph.finish(llm->ctx0, llm->gf); // steer-gguf\n\n",
     "before"),
    ("src/llama-context.cpp",
     "            // needs to happen before the graph is built\n            n_outputs = n_outputs_new;\n",
     "            steer_route_prepare(ubatch); // steer-gguf: the rows its last layer computes\n",
     "after"),
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
     "    void steer_set_eval_callback(ggml_backend_sched_eval_callback cb, void * user_data);\n"
     "    llama_steer_state steer_state; // tables, slots and sequence bindings\n"
     "    llama_steer_route steer_route; // routing recorded by the graph, until taken\n"
     "    void steer_route_extract(const llm_graph_result * res, const llama_ubatch & ubatch);\n"
     "    void steer_route_changed();\n"
     "    void steer_route_prepare(const llama_ubatch & ubatch);\n\n",
     "before"),
    ("src/llama-context.h",
     "struct llama_context {\n",
     "struct llama_adapter_steer; // steer-gguf\n\n",
     "before"),
    ("src/llama-context.cpp",
     "        /*.res         =*/ res,\n    };\n",
     "        /*.res         =*/ res,\n"
     "        /*.steer       =*/ steer.get(), // steer-gguf\n"
     "        /*.steer_gen   =*/ steer_gen,\n"
     "        /*.steer_route =*/ steer_route.flags ? &steer_route : nullptr,\n"
     "        /*.steer_route_flags =*/ steer_route.flags,\n"
     "        /*.steer_route_nsel  =*/ steer_route.flags && steer_route.sel_for == ubatch.data ? steer_route.n_sel : -1,\n    };\n",
     "replace"),
    # after each micro-batch's graph: queue the host copies of its routing (one sync per decode,
    # when the routing is read, as for logits)
    ("src/llama-context.cpp",
     "        n_outputs_prev += n_outputs;\n        n_tokens_prev  += ubatch.n_tokens;\n",
     "        if (steer_route.flags) { // steer-gguf\n"
     "            steer_route_extract(res, ubatch);\n"
     "        }\n\n",
     "before"),
    # Backend fusion made visible: STEER_GGUF_LOG_FUSION=1 prints one line per fused top-k-MoE
    # dispatch, naming the layer's top-k tensor (benchmarks/gpu_check.py, tests/test_vulkan.py)
    ("ggml/src/ggml-cuda/topk-moe.cu",
     "                           const ggml_cuda_topk_moe_args & args) {\n    GGML_ASSERT(logits->type == GGML_TYPE_F32);\n",
     "    { // steer-gguf\n"
     "        static const bool steer_log = getenv(\"STEER_GGUF_LOG_FUSION\") && atoi(getenv(\"STEER_GGUF_LOG_FUSION\"));\n"
     "        if (steer_log) { fprintf(stderr, \"steer-gguf: fused topk_moe %s\\n\", ids->name); }\n"
     "    }\n",
     "after_first_line"),
    ("ggml/src/ggml-vulkan/ggml-vulkan.cpp",
     "    vk_op_topk_moe_push_constants pc {};\n",
     "    { // steer-gguf\n"
     "        static const bool steer_log = getenv(\"STEER_GGUF_LOG_FUSION\") && atoi(getenv(\"STEER_GGUF_LOG_FUSION\"));\n"
     "        if (steer_log) { fprintf(stderr, \"steer-gguf: fused topk_moe %s\\n\", ids->name); }\n"
     "    }\n",
     "before"),
    # Debian 12 ships Vulkan headers 1.3.239; vk::LayerSettingEXT (validation-layer settings at
    # instance creation) needs >= 1.3.261. Older headers build without those settings; a no-op
    # on current headers.
    ("ggml/src/ggml-vulkan/ggml-vulkan.cpp",
     VK_SETTINGS_BLOCK,
     "#if VK_HEADER_VERSION >= 261 // steer-gguf\n" + VK_SETTINGS_BLOCK +
     "#else // steer-gguf: older Vulkan headers, no layer settings\n"
     "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);\n"
     "#endif\n",
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
        elif where == "before_last_line":
            head, last = anchor.rstrip("\n").rsplit("\n", 1)
            new = src.replace(anchor, head + "\n" + text + last + "\n")
        elif where == "after_first_line_2":
            a, b, rest = anchor.split("\n", 2)
            new = src.replace(anchor, a + "\n" + b + "\n" + text + rest)
        elif where == "replace":
            new = src.replace(anchor, text)
        else:
            raise ValueError(where)
        path.write_text(new)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: patch_llama.py LLAMA_CPP_DIR")
    apply(pathlib.Path(sys.argv[1]))

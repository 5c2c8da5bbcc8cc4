// Per-context steering tensors, kept on each layer's own device like llama.cpp's
// control-vector adapter, so the graph never copies the table between backends.
//
// An adapter is an immutable snapshot of every table of a context (llama-steer.cpp builds a
// new one whenever a table changes). Uniform: one table for every token, no graph input.
// Per-sequence: table 0 is the identity, and each token takes the table its sequence is bound
// to through a graph input, so rebinding a sequence never rebuilds the graph.
#pragma once

#include "ggml.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

struct llama_model;
struct llama_ubatch;
class llm_graph_result;
class llm_graph_input_steer_sel;

// which table each sequence's tokens take (index into the adapter's tables); the context
// writes it, the graph input of every per-sequence graph reads it at each micro-batch
struct llama_steer_binds {
    std::vector<int32_t> seq_table; // by sequence id
};

// Routing recorded by the graph (API version 3): one layer of one micro-batch, copied from the
// graph's outputs into host memory. The copy may still be in flight (an async get on a GPU
// backend) until the context synchronizes, so a chunk's buffers are allocated once, never
// resized; moving a chunk keeps them where they are.
struct llama_steer_route_chunk {
    int32_t n_rows = 0;
    int32_t k      = 0;
    size_t ids_row = 0;                     // bytes between rows in `ids`
    size_t w_elem = 0, w_row = 0;           // bytes between a row's weights, and between rows
    std::vector<char> ids;                  // int32 rows of the top-k tensor, as laid out there
    std::vector<char> w;                    // the final expert weights, as laid out there (or empty)
    std::vector<int32_t> batch_idx;         // each row's token: its index in its llama_decode batch
    std::vector<int32_t> row_k;             // each row's own K where a micro-batch mixes K (else empty)
    std::vector<char> norms;                // float [n_rows, k], contiguous: expert output norms (or empty)
};

// The rows one micro-batch's last layer computes while routed rows that need no logits are
// asked for (llama_steer_route_rows): its outputs and those rows. Upstream computes the last
// layer for output rows only; here out_ids lists `rows`, and just before the output norm the
// hidden states are cut to the outputs, so logits are computed for output rows alone.
struct llama_steer_sel {
    std::vector<int32_t> rows;        // micro-batch indices, ascending
    std::vector<int32_t> out_of_sel;  // for each output, in micro-batch order: its place in rows
    std::vector<int32_t> back;        // for each of rows: its output's index (0 where no output)
    std::vector<char>    in_rows;     // by micro-batch index
};

// what a context records (llama_steer_route_record) and has recorded since the last clear
struct llama_steer_route {
    int32_t flags = 0;                      // LLAMA_STEER_ROUTE_* (steer.h); 0: the upstream graph
    std::vector<char> copy_layer;           // by layer: keep through a copy node (layer off the CPU)
    std::vector<std::vector<llama_steer_route_chunk>> layers; // by layer, in decode order
    std::string error;                      // the first problem seen since the last clear

    std::vector<char> want;                 // by batch index: route this token (llama_steer_route_rows)
    std::shared_ptr<llama_steer_sel> sel = std::make_shared<llama_steer_sel>(); // the current micro-batch's
    std::shared_ptr<const void> sel_for;    // the micro-batch data `sel` was made for, held so
                                            // that no later micro-batch can reuse its address
    int64_t n_sel = -1;                     // its row count; -1: the last layer computes outputs only
};

// one graph build's token -> table inputs, made on first use (llama-steer.cpp), and the
// routing tensors it keeps as outputs while the context records
struct llama_steer_graph {
    llm_graph_result * res = nullptr;
    int64_t n_tokens  = 0;
    int64_t n_outputs = 0;
    const llama_steer_route * route = nullptr; // non-null: keep every MoE layer's routing
    int64_t n_sel = -1;          // >= 0: the last layer computes these rows (llama_steer_sel)
    const llama_ubatch * ubatch = nullptr; // the micro-batch this graph is built for
    // experts per token of this graph (llama_adapter_steer::graph_k), made on first use: by
    // layer, 0 for the model's own k; mixed: the layer holds tokens of several K
    std::vector<int32_t> k;
    std::vector<char> k_mixed;
    std::vector<char> tables_used; // by adapter table: some token of the micro-batch takes it
    ggml_tensor * tok = nullptr; // I32 [n_tokens]
    ggml_tensor * out = nullptr; // I32 [n_outputs, or n_sel]: the rows the last layer computes
    llm_graph_input_steer_sel * sel_inp = nullptr; // holds the two inputs below

    int64_t n_last() const { return n_sel >= 0 ? n_sel : n_outputs; }

    // build_inp_out_ids while n_sel >= 0: the last layer's rows
    ggml_tensor * inp_sel_rows(ggml_context * ctx);
    // build_norm: the hidden states before the output norm, cut to the output rows
    ggml_tensor * cut_to_outputs(ggml_context * ctx, ggml_tensor * cur, const ggml_tensor * mw, int il);
    // after the architecture's graph: logits of output rows only, wherever the cut above did not apply
    void finish(ggml_context * ctx, ggml_cgraph * gf);
    // build_moe_ffn of the last layer: the output rows among `cur`'s, if it holds routed rows too
    // (only those reach the output head; the others need the layer's routing, not its experts)
    ggml_tensor * expert_rows(ggml_context * ctx, const ggml_tensor * cur);
    // and the map back from the experts' output rows to every row of the layer
    ggml_tensor * expert_back(ggml_context * ctx);

    // build_moe_ffn, after the weights are in the graph: mark the layer's top-k (and weights)
    // as graph outputs, so the allocator keeps them for the host copy after the graph ran
    void keep_route(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * ids, ggml_tensor * weights, int il);
    // build_moe_ffn, after the expert down projection [n_embd, k, n_rows]: keep each expert
    // output's L2 norm while the context records them (LLAMA_STEER_ROUTE_NORMS)
    void keep_norms(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * experts, int il);
};

struct llama_adapter_steer {
    struct layer {
        // [n_expert, STEER_N_ROWS * n_tables] (steer-rule.h): table t's rows are t*STEER_N_ROWS + row;
        // null: no table steers this layer
        ggml_tensor * coef = nullptr;
        bool any_act   = false;       // over all tables
        bool any_deact = false;
        bool on_cpu    = false;       // the layer lives on the CPU backend: steer with one fused op
        // uniform adapters only: the model's selection bias with the table applied (activated:
        // max + 2, deactivated: min - 2), and the model tensor it was made from; null where none
        ggml_tensor * sel_bias = nullptr;
        const ggml_tensor * sel_bias_src = nullptr;
        // per-sequence adapters whose tables give this layer different K: the distinct K
        // (ascending) and kmask [kvals.size(), n_tables], 1 where table t takes kvals[j]
        std::vector<int32_t> kvals;
        ggml_tensor * kmask = nullptr;
    };

    std::vector<layer> layers; // by real layer index
    // experts per token by table and layer, 0: the model's own there (empty: no table sets K)
    std::vector<std::vector<int32_t>> table_k;
    std::vector<int32_t> model_k; // the model's k by layer
    int32_t n_tables = 1;
    bool per_seq = false;
    std::shared_ptr<llama_steer_binds> binds; // per-sequence adapters

    bool has_layer(int il) const {
        return il >= 0 && (size_t) il < layers.size() && layers[il].coef != nullptr;
    }
    bool any_topk() const { return !table_k.empty(); }
    // table t's experts per token at layer il, the model's k where the table sets none
    int32_t k_of(int32_t t, int il) const;
    // the K layer il of this graph is built with (0: the model's k, the upstream graph): the
    // one K of the micro-batch's tokens, or the widest where they differ (graph_mixed), which
    // mix_weights then cuts to each token's own K
    int32_t graph_k(llama_steer_graph & g, int il) const;
    bool graph_mixed(llama_steer_graph & g, int il) const;
    // the routing weights [1, K, n_rows] of a mixed layer, from the selected experts' gating
    // values: each token's first K_t columns computed as a graph built with K_t computes them
    // (softmax after top-k, normalisation over K_t), the rest 0, so the experts beyond K_t add
    // exactly nothing
    ggml_tensor * mix_weights(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * weights, int il,
                              bool softmax_after, bool norm) const;
    // the adapter table a token of a micro-batch takes (its first sequence id's)
    int32_t table_of_token(const llama_ubatch & ub, uint32_t i) const;

    ggml_tensor * apply_logits(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * logits, int il) const;
    ggml_tensor * apply_selection(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * scores, int il,
                                  bool grouped) const;
    // the steered selection bias to add in place of exp_probs_b, or null (steer the scores instead)
    ggml_tensor * selection_bias(int il, const ggml_tensor * exp_probs_b) const;

    // one table as given to the C API, already validated
    struct table {
        std::vector<int8_t> actions; // [n_layer * n_expert]
        std::vector<float>  bias;    // empty: none
        std::vector<int32_t> topk;   // [n_layer], 0: the model's k; empty: none
        float eps = 0.0f;
    };
    // builds the tensors; a null table is the identity. false if a buffer cannot be allocated
    bool init(const llama_model & model, const std::vector<const table *> & tables, bool per_seq, int32_t n_expert);

private:
    ggml_tensor * steer(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * x, const layer & l, int add_row,
                        bool clamp) const;
    ggml_tensor * token_tables(ggml_context * ctx, llama_steer_graph & g, int64_t n_rows) const;

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

// what a context keeps of its tables between rebuilds (llama-steer.cpp)
struct llama_steer_state {
    std::optional<llama_adapter_steer::table> all;                // llama_steer_set: unbound sequences
    std::vector<std::optional<llama_adapter_steer::table>> slots; // llama_steer_slot_set
    std::vector<int32_t> seq_slot;                                // by sequence id, -1: unbound
    std::vector<int32_t> slot_table;                              // by slot: table index in the adapter
    int32_t all_table = 0;
    std::shared_ptr<llama_steer_binds> binds = std::make_shared<llama_steer_binds>();
};

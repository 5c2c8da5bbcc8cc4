// steer-gguf: the steering adapter and the C API, compiled into libllama.
#include "steer.h"
#include "llama-steer-adapter.h"
#include "steer-rule.h"

#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

static thread_local std::string g_last_error;

static int32_t fail(int32_t code, std::string msg) {
    g_last_error = std::move(msg);
    return code;
}

// ---- graph side ---------------------------------------------------------------------------

// per-token max (or min) of x [n_expert, n_tokens] as [1, n_tokens]: argmax + get_rows run on
// every backend (CPU, CUDA, Metal), unlike a custom op
static ggml_tensor * row_extreme(ggml_context * ctx, ggml_tensor * x, bool want_max) {
    const int64_t n_expert = x->ne[0];
    const int64_t n_tokens = x->ne[1];
    ggml_tensor * idx = ggml_argmax(ctx, want_max ? x : ggml_neg(ctx, x));        // [n_tokens]
    ggml_tensor * rows = ggml_reshape_3d(ctx, x, 1, n_expert, n_tokens);
    ggml_tensor * v = ggml_get_rows(ctx, rows, ggml_reshape_2d(ctx, idx, 1, n_tokens)); // [1, 1, n_tokens]
    return ggml_reshape_2d(ctx, v, 1, n_tokens);
}

// whether buffers of this type belong to this process's own CPU backend, the only one that runs
// the custom ops below (their function pointers mean nothing in another process). Host-visible
// GPU buffers (CUDA pinned, Metal shared) do not; nor does a device of llama.cpp's RPC backend,
// whatever type the remote device reports (GPU today; ggml-rpc.cpp means to ask the server).
static bool steer_local_cpu(ggml_backend_buffer_type_t buft) {
    if (!ggml_backend_buft_is_host(buft)) {
        return false;
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (!dev) {
        return true;
    }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    return ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU &&
           !(reg && std::strcmp(ggml_backend_reg_name(reg), "RPC") == 0);
}

// the CPU ops: userdata packs the add row (bits 0-1), any_act (2), any_deact (3), clamp (4)
static void steer_cpu_op(ggml_tensor * dst, const ggml_tensor * x, const ggml_tensor * coef,
                         int ith, int nth, void * userdata) {
    const intptr_t f = (intptr_t) userdata;
    const int n = (int) x->ne[0];
    const float * c = (const float *) coef->data;
    const int64_t n_rows = x->ne[1] * x->ne[2] * x->ne[3];
    for (int64_t r = ith; r < n_rows; r += nth) {
        const int64_t i1 = r % x->ne[1], i2 = (r / x->ne[1]) % x->ne[2], i3 = r / (x->ne[1] * x->ne[2]);
        const float * xr = (const float *) ((const char *) x->data + i1 * x->nb[1] + i2 * x->nb[2] + i3 * x->nb[3]);
        float * yr = (float *) ((char *) dst->data + i1 * dst->nb[1] + i2 * dst->nb[2] + i3 * dst->nb[3]);
        steer_row(xr, yr, n, c, (int) (f & 3), (f >> 2) & 1, (f >> 3) & 1, (f >> 4) & 1);
    }
}

// per-sequence: x [n_expert, n_tokens], tabs I32 [n_tokens] names each token's table;
// table 0 (the identity) copies the row, so unsteered tokens keep their exact values
static void steer_cpu_op_tables(ggml_tensor * dst, const ggml_tensor * x, const ggml_tensor * coef,
                                const ggml_tensor * tabs, int ith, int nth, void * userdata) {
    const intptr_t f = (intptr_t) userdata;
    const int n = (int) x->ne[0];
    const int64_t n_tables = coef->ne[1] / STEER_N_ROWS;
    const float * c = (const float *) coef->data;
    const int32_t * tab = (const int32_t *) tabs->data;
    for (int64_t r = ith; r < x->ne[1]; r += nth) {
        const float * xr = (const float *) ((const char *) x->data + r * x->nb[1]);
        float * yr = (float *) ((char *) dst->data + r * dst->nb[1]);
        const int32_t t = tab[r];
        if (t <= 0 || t >= n_tables) {
            std::memcpy(yr, xr, n * sizeof(float));
            continue;
        }
        steer_row(xr, yr, n, c + (size_t) t * STEER_N_ROWS * n, (int) (f & 3), (f >> 2) & 1, (f >> 3) & 1,
                  (f >> 4) & 1);
    }
}

// the token -> table input of a per-sequence graph: filled from each micro-batch's sequence
// ids and the context's bindings, so a new binding needs a new input, not a new graph
class llm_graph_input_steer : public llm_graph_input_i {
public:
    llm_graph_input_steer(std::shared_ptr<llama_steer_binds> binds, bool outputs_only,
                          std::shared_ptr<const llama_steer_sel> sel)
        : binds(std::move(binds)), outputs_only(outputs_only), sel(std::move(sel)) {}

    void set_input(const llama_ubatch * ub) override {
        const int64_t n = tables->ne[0];
        const std::vector<int32_t> & seq_table = binds->seq_table;
        std::vector<int32_t> v;
        v.reserve(n);
        for (uint32_t i = 0; i < ub->n_tokens && (int64_t) v.size() < n; ++i) {
            // the last layer's rows: the outputs, or the outputs and the routed rows
            if (outputs_only && (sel ? !sel->in_rows[i] : ub->output && !ub->output[i])) {
                continue;
            }
            // a token shared by several sequences takes its first sequence's table
            const llama_seq_id s = ub->n_seq_id && ub->n_seq_id[i] > 0 ? ub->seq_id[i][0] : -1;
            v.push_back(s >= 0 && (size_t) s < seq_table.size() ? seq_table[s] : 0);
        }
        v.resize(n, 0);
        ggml_backend_tensor_set(tables, v.data(), 0, n * sizeof(int32_t));
    }

    bool can_reuse(const llm_graph_params & params) override {
        const int64_t n_last = params.steer_route_nsel >= 0 ? params.steer_route_nsel : (int64_t) params.n_outputs;
        return tables->ne[0] == (outputs_only ? n_last : (int64_t) params.ubatch.n_tokens);
    }

    ggml_tensor * tables = nullptr; // I32 [n]
    std::shared_ptr<llama_steer_binds> binds;
    bool outputs_only;
    std::shared_ptr<const llama_steer_sel> sel; // set while the last layer computes routed rows too
};

ggml_tensor * llama_adapter_steer::token_tables(ggml_context * ctx, llama_steer_graph & g, int64_t n_rows) const {
    const bool outputs_only = n_rows != g.n_tokens;
    ggml_tensor *& t = outputs_only ? g.out : g.tok;
    if (!t) {
        auto inp = std::make_unique<llm_graph_input_steer>(binds, outputs_only,
            g.n_sel >= 0 && g.route ? std::shared_ptr<const llama_steer_sel>(g.route->sel) : nullptr);
        inp->tables = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_rows);
        ggml_set_input(inp->tables);
        ggml_set_name(inp->tables, outputs_only ? "steer_tables_out" : "steer_tables");
        t = inp->tables;
        g.res->add_input(std::move(inp));
    }
    return t;
}

ggml_tensor * llama_adapter_steer::steer(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * x, const layer & l,
                                         int add_row, bool clamp) const {
    if (per_seq && (x->ne[2] != 1 || x->ne[3] != 1)) {
        // one row per token for the table lookup; the caller gets its own shape back
        ggml_tensor * rows = ggml_reshape_2d(ctx, ggml_cont(ctx, x), x->ne[0], ggml_nrows(x));
        return ggml_reshape_4d(ctx, steer(ctx, g, rows, l, add_row, clamp), x->ne[0], x->ne[1], x->ne[2], x->ne[3]);
    }
    if (l.on_cpu) {
        // one node instead of a dozen: on the CPU every node costs a barrier between threads,
        // which is most of what a one-token decode spends on these tiny rows
        if (x->nb[0] != sizeof(float)) {
            x = ggml_cont(ctx, x);
        }
        const intptr_t f = add_row | (l.any_act << 2) | (l.any_deact << 3) | ((intptr_t) clamp << 4);
        if (per_seq) {
            return ggml_map_custom3(ctx, x, l.coef, token_tables(ctx, g, x->ne[1]), steer_cpu_op_tables,
                                    GGML_N_TASKS_MAX, (void *) f);
        }
        return ggml_map_custom2(ctx, x, l.coef, steer_cpu_op, GGML_N_TASKS_MAX, (void *) f);
    }
    // GPU backends: the rule of steer-rule.h as ggml ops, same arithmetic in the same order;
    // x - mask*(x - extreme) puts masked experts exactly on the row extreme. Uniform: one
    // coefficient row broadcast over the tokens; per-sequence: each token's row, gathered
    // from its table (the identity's zeros leave finite values exactly as they were)
    const int64_t n = l.coef->ne[0];
    ggml_tensor * tabs = per_seq ? token_tables(ctx, g, x->ne[1]) : nullptr;
    auto row = [&](int r) {
        if (!per_seq) {
            return ggml_view_1d(ctx, l.coef, n, r * l.coef->nb[1]);
        }
        ggml_tensor * by_table = ggml_view_2d(ctx, l.coef, n, n_tables, STEER_N_ROWS * l.coef->nb[1], r * l.coef->nb[1]);
        return ggml_get_rows(ctx, by_table, tabs);
    };
    if (!ggml_is_contiguous(x)) {
        x = ggml_cont(ctx, x);
    }
    if (clamp) {
        x = ggml_clamp(ctx, x, -STEER_CLAMP, STEER_CLAMP);
    }
    ggml_tensor * out = x;
    if (l.any_act) {
        ggml_tensor * mx = row_extreme(ctx, x, true);
        out = ggml_sub(ctx, out, ggml_mul(ctx, ggml_sub(ctx, x, mx), row(STEER_ACT)));
    }
    if (l.any_deact) {
        ggml_tensor * mn = row_extreme(ctx, x, false);
        out = ggml_sub(ctx, out, ggml_mul(ctx, ggml_sub(ctx, x, mn), row(STEER_DEACT)));
    }
    return ggml_add(ctx, out, row(add_row));
}

ggml_tensor * llama_adapter_steer::apply_logits(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * logits,
                                                int il) const {
    if (!has_layer(il)) {
        return logits;
    }
    return steer(ctx, g, logits, layers[il], STEER_ADD_LOGIT, false);
}

ggml_tensor * llama_adapter_steer::apply_selection(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * scores,
                                                   int il, bool grouped) const {
    if (!has_layer(il) || (!layers[il].any_act && !layers[il].any_deact)) {
        return scores;  // a bias alone steers the logits only
    }
    return steer(ctx, g, scores, layers[il], STEER_ADD_SEL, grouped);
}

ggml_tensor * llama_adapter_steer::selection_bias(int il, const ggml_tensor * exp_probs_b) const {
    if (!has_layer(il) || exp_probs_b == nullptr || layers[il].sel_bias_src != exp_probs_b) {
        return nullptr;
    }
    return layers[il].sel_bias;
}

bool llama_adapter_steer::init(const llama_model & model, const std::vector<const table *> & tables, bool per_seq_,
                               int32_t n_expert) {
    const int32_t n_layer = (int32_t) model.hparams.n_layer();
    layers.assign(n_layer, layer{});
    n_tables = (int32_t) tables.size();
    per_seq = per_seq_;
    model_k.assign(n_layer, 0);
    for (int32_t il = 0; il < n_layer; ++il) {
        model_k[il] = model.layers[il].ffn_gate_inp ? (int32_t) model.hparams.n_expert_used(il) : 0;
    }
    table_k.clear();
    if (std::any_of(tables.begin(), tables.end(), [](const table * t) { return t && !t->topk.empty(); })) {
        table_k.assign(n_tables, std::vector<int32_t>(n_layer, 0));
        for (int32_t t = 0; t < n_tables; ++t) {
            if (tables[t] && !tables[t]->topk.empty()) {
                table_k[t] = tables[t]->topk;
            }
        }
    }

    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;
    auto ctx_for = [&](ggml_backend_buffer_type_t buft) -> ggml_context * {
        auto it = ctx_map.find(buft);
        if (it != ctx_map.end()) {
            return it->second;
        }
        ggml_init_params params = { (size_t) 2 * n_layer * ggml_tensor_overhead(), nullptr, true };
        ggml_context * c = ggml_init(params);
        if (c) {
            ctx_map[buft] = c;
            ctxs.emplace_back(c);
        }
        return c;
    };

    const char * env = std::getenv("STEER_GGUF_PORTABLE_OPS");
    const bool portable = env && env[0] == '1';
    const size_t per_table = (size_t) STEER_N_ROWS * n_expert;
    std::vector<std::vector<float>> host(n_layer);
    std::vector<std::vector<float>> host_bias(n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        layer & l = layers[il];
        host[il].assign(per_table * n_tables, 0.0f);  // a null table stays all zeros: the identity
        steer_flags f;
        for (int32_t t = 0; t < n_tables; ++t) {
            if (!tables[t]) {
                continue;
            }
            const table & tb = *tables[t];
            const steer_flags ft = steer_coefficients(tb.actions.data() + (size_t) il * n_expert,
                tb.bias.empty() ? nullptr : tb.bias.data() + (size_t) il * n_expert, n_expert, tb.eps,
                host[il].data() + t * per_table);
            f.act   |= ft.act;
            f.deact |= ft.deact;
            f.bias  |= ft.bias;
        }
        if (!f.any()) {
            continue;  // no nodes at all for this layer
        }
        l.any_act   = f.act;
        l.any_deact = f.deact;
        ggml_backend_buffer_type_t buft = model.select_buft(il);
        // only the local CPU backend runs the custom op; GPU and RPC devices take the op chain.
        // STEER_GGUF_PORTABLE_OPS=1 forces the GPU op chain on the CPU too, so that machines
        // without a GPU can test what GPUs run.
        l.on_cpu = steer_local_cpu(buft) && !portable;
        ggml_context * c = ctx_for(buft);
        if (!c) {
            return false;
        }
        l.coef = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_expert, (int64_t) STEER_N_ROWS * n_tables);

        // a selection bias (DeepSeek-V3 style): the graph adds it to gating scores in [0, 1]
        // before the top-k, so forcing an expert on or off is a bias of max + 2 or min - 2,
        // and the gating -> add -> top-k pattern that backends fuse stays intact. Uniform
        // adapters only: the fused kernels read one bias vector for every token, so a
        // per-token bias there would be wrong, not merely slow
        const ggml_tensor * b_src = model.layers[il].ffn_exp_probs_b;
        if (!per_seq && (f.act || f.deact) && b_src && b_src->type == GGML_TYPE_F32 &&
            ggml_nelements(b_src) == n_expert && ggml_is_contiguous(b_src)) {
            const int8_t * a = tables[0]->actions.data() + (size_t) il * n_expert;
            std::vector<float> & hb = host_bias[il];
            hb.resize(n_expert);
            ggml_backend_tensor_get(b_src, hb.data(), 0, n_expert * sizeof(float));
            float bmax = hb[0], bmin = hb[0];
            for (float v : hb) {
                bmax = std::max(bmax, v);
                bmin = std::min(bmin, v);
            }
            for (int32_t e = 0; e < n_expert; ++e) {
                if (a[e] == LLAMA_STEER_ACTIVATE) {
                    hb[e] = bmax + 2.0f;
                } else if (a[e] == LLAMA_STEER_DEACTIVATE) {
                    hb[e] = bmin - 2.0f;
                }
            }
            l.sel_bias = ggml_new_tensor_1d(c, GGML_TYPE_F32, n_expert);
            l.sel_bias_src = b_src;
        }
    }

    // per-sequence K: which K each table gives a layer, as a [K values x tables] 0/1 table on
    // the layer's device, gathered per token like the coefficient rows
    std::vector<std::vector<float>> host_kmask(n_layer);
    for (int32_t il = 0; per_seq && any_topk() && il < n_layer; ++il) {
        layer & l = layers[il];
        for (int32_t t = 0; t < n_tables; ++t) {
            l.kvals.push_back(k_of(t, il));
        }
        std::sort(l.kvals.begin(), l.kvals.end());
        l.kvals.erase(std::unique(l.kvals.begin(), l.kvals.end()), l.kvals.end());
        if (l.kvals.size() < 2) {
            l.kvals.clear();
            continue;
        }
        const int64_t n_kv = (int64_t) l.kvals.size();
        host_kmask[il].assign(n_kv * n_tables, 0.0f);
        for (int32_t t = 0; t < n_tables; ++t) {
            const auto j = std::find(l.kvals.begin(), l.kvals.end(), k_of(t, il)) - l.kvals.begin();
            host_kmask[il][(size_t) t * n_kv + j] = 1.0f;
        }
        ggml_context * c = ctx_for(model.select_buft(il));
        if (!c) {
            return false;
        }
        l.kmask = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_kv, n_tables);
    }

    for (auto & [buft, c] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
        if (!buf) {
            return false;
        }
        bufs.emplace_back(buf);
    }

    for (int32_t il = 0; il < n_layer; ++il) {
        if (layers[il].coef) {
            ggml_backend_tensor_set(layers[il].coef, host[il].data(), 0, host[il].size() * sizeof(float));
        }
        if (layers[il].sel_bias) {
            ggml_backend_tensor_set(layers[il].sel_bias, host_bias[il].data(), 0, host_bias[il].size() * sizeof(float));
        }
        if (layers[il].kmask) {
            ggml_backend_tensor_set(layers[il].kmask, host_kmask[il].data(), 0, host_kmask[il].size() * sizeof(float));
        }
    }
    return true;
}

int32_t llama_adapter_steer::k_of(int32_t t, int il) const {
    if (il < 0 || (size_t) il >= model_k.size()) {
        return 0;
    }
    const int32_t k = t >= 0 && (size_t) t < table_k.size() ? table_k[t][il] : 0;
    return k > 0 ? k : model_k[il];
}

int32_t llama_adapter_steer::table_of_token(const llama_ubatch & ub, uint32_t i) const {
    if (!per_seq) {
        return 0;
    }
    // as llm_graph_input_steer::set_input: a token shared by sequences takes its first one's
    const llama_seq_id s = ub.n_seq_id && ub.n_seq_id[i] > 0 ? ub.seq_id[i][0] : -1;
    const std::vector<int32_t> & seq_table = binds->seq_table;
    return s >= 0 && (size_t) s < seq_table.size() ? seq_table[s] : 0;
}

// Holds the experts per token a graph was built with: a graph is reused only for a micro-batch
// whose tokens take the same K in every layer (a rebinding may change that without a new table)
class llm_graph_input_steer_k : public llm_graph_input_i {
public:
    llm_graph_input_steer_k(const llama_adapter_steer * a, std::vector<char> used) : a(a), used(std::move(used)) {}

    void set_input(const llama_ubatch * ub) override { GGML_UNUSED(ub); }

    bool can_reuse(const llm_graph_params & params) override {
        return params.steer == a && tables_used(*a, params.ubatch) == used;
    }

    static std::vector<char> tables_used(const llama_adapter_steer & a, const llama_ubatch & ub) {
        std::vector<char> used(a.n_tables, 0);
        for (uint32_t i = 0; i < ub.n_tokens; ++i) {
            const int32_t t = a.table_of_token(ub, i);
            used[t >= 0 && t < a.n_tables ? t : 0] = 1;
        }
        return used;
    }

    const llama_adapter_steer * a;
    std::vector<char> used;
};

int32_t llama_adapter_steer::graph_k(llama_steer_graph & g, int il) const {
    if (!any_topk() || il < 0 || (size_t) il >= model_k.size()) {
        return 0;
    }
    if (g.k.empty()) {
        const int32_t n_layer = (int32_t) model_k.size();
        if (per_seq && g.ubatch) {
            g.tables_used = llm_graph_input_steer_k::tables_used(*this, *g.ubatch);
            if (g.res) {
                g.res->add_input(std::make_unique<llm_graph_input_steer_k>(this, g.tables_used));
            }
        } else {
            g.tables_used.assign(n_tables, 0);
            g.tables_used[0] = 1;
        }
        g.k.assign(n_layer, 0);
        g.k_mixed.assign(n_layer, 0);
        for (int32_t l = 0; l < n_layer; ++l) {
            bool any_set = false;
            int32_t lo = 0, hi = 0;
            for (int32_t t = 0; t < n_tables; ++t) {
                if (!g.tables_used[t]) {
                    continue;
                }
                any_set |= !table_k.empty() && table_k[t][l] > 0;
                const int32_t k = k_of(t, l);
                lo = lo ? std::min(lo, k) : k;
                hi = std::max(hi, k);
            }
            // no token's table sets K here: the upstream graph, bit for bit
            g.k[l] = any_set ? hi : 0;
            g.k_mixed[l] = any_set && lo != hi;
        }
    }
    return g.k[il];
}

bool llama_adapter_steer::graph_mixed(llama_steer_graph & g, int il) const {
    return graph_k(g, il) > 0 && g.k_mixed[il] && layers[il].kmask;
}

ggml_tensor * llama_adapter_steer::mix_weights(ggml_context * ctx, llama_steer_graph & g, ggml_tensor * weights,
                                               int il, bool softmax_after, bool norm) const {
    const layer & l = layers[il];
    const int64_t kmax = weights->ne[1];
    const int64_t n = weights->ne[2];
    ggml_tensor * w = ggml_reshape_2d(ctx, weights, kmax, n);
    ggml_tensor * m = ggml_get_rows(ctx, l.kmask, token_tables(ctx, g, n)); // [n_kv, n]
    ggml_tensor * acc = nullptr;
    for (size_t j = 0; j < l.kvals.size(); ++j) {
        const int64_t k = l.kvals[j];
        bool used = false;
        for (int32_t t = 0; t < n_tables && !used; ++t) {
            used = g.tables_used[t] && k_of(t, il) == k;
        }
        if (!used || k > kmax) {
            continue;
        }
        // the same nodes on the same values as a graph built with K = k (llama-graph.cpp's
        // build_moe_ffn), then widened with zeros and kept for this K's tokens only; the
        // others' terms are 0 and x + 0 is x, so each token's weights are bit for bit its own
        ggml_tensor * wk = k == kmax ? w : ggml_cont(ctx, ggml_view_2d(ctx, w, k, n, w->nb[1], 0));
        if (softmax_after) {
            wk = ggml_soft_max(ctx, wk);
        }
        if (norm) {
            ggml_tensor * sum = ggml_clamp(ctx, ggml_sum_rows(ctx, wk), 6.103515625e-5, INFINITY);
            wk = ggml_div(ctx, wk, sum);
        }
        if (k < kmax) {
            wk = ggml_pad(ctx, wk, (int) (kmax - k), 0, 0, 0);
        }
        ggml_tensor * mk = ggml_cont(ctx, ggml_view_2d(ctx, m, 1, n, m->nb[1], j * m->nb[0]));
        wk = ggml_mul(ctx, wk, mk);
        acc = acc ? ggml_add(ctx, acc, wk) : wk;
    }
    return ggml_reshape_3d(ctx, acc, 1, kmax, n);
}

// ---- routing as graph outputs ---------------------------------------------------------------

// holds the routing tensors of one graph; an input only so that the graph result owns it and
// graph reuse keeps it (nothing to set: the tensors are outputs, not inputs)
class llm_graph_input_steer_route : public llm_graph_input_i {
public:
    void set_input(const llama_ubatch * ub) override { GGML_UNUSED(ub); }
    bool can_reuse(const llm_graph_params & params) override { GGML_UNUSED(params); return true; }

    struct kept {
        int il;
        ggml_tensor * ids; // I32 [k, n_rows], rows with their stride
        ggml_tensor * w;   // F32 [1, k, n_rows] or [k, n_rows], or null
        ggml_tensor * norms = nullptr; // F32 [1, k, n_rows], contiguous, or null
    };
    std::vector<kept> layers;
};

// mark t and every tensor it views as outputs: the allocator frees a view's source when the
// view's last reader is done, unless the source itself is an output
static void keep_chain(ggml_tensor * t) {
    for (; t; t = t->view_src) {
        ggml_set_output(t);
    }
}

void llama_steer_graph::keep_route(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * ids, ggml_tensor * weights,
                                   int il) {
    if (!route || !res || il < 0) {
        return;
    }
    const bool want_w = (route->flags & LLAMA_STEER_ROUTE_WEIGHTS) != 0;
    const bool copy = (size_t) il < route->copy_layer.size() && route->copy_layer[il];
    if (copy) {
        // Off the CPU, a backend fuses gating -> argsort -> view -> get_rows (-> norm) into one
        // kernel only while none of the nodes inside is an output: copy the two results out
        // instead (two small nodes after the fused ones, which stay consecutive)
        ids = ggml_cont(ctx, ids);
        ggml_set_name(ids, ("steer_route_topk-" + std::to_string(il)).c_str());
        if (want_w) {
            weights = ggml_cont(ctx, weights);
            ggml_set_name(weights, ("steer_route_weights-" + std::to_string(il)).c_str());
        }
    }
    keep_chain(ids);
    ggml_build_forward_expand(gf, ids);
    if (want_w) {
        keep_chain(weights);
        ggml_build_forward_expand(gf, weights);
    }
    llm_graph_input_steer_route * inp = nullptr;
    for (auto & i : res->inputs) {
        if ((inp = dynamic_cast<llm_graph_input_steer_route *>(i.get()))) {
            break;
        }
    }
    if (!inp) {
        inp = static_cast<llm_graph_input_steer_route *>(res->add_input(std::make_unique<llm_graph_input_steer_route>()));
    }
    inp->layers.push_back({il, ids, want_w ? weights : nullptr});
}

void llama_steer_graph::keep_norms(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * experts, int il) {
    if (!route || !res || il < 0 || !(route->flags & LLAMA_STEER_ROUTE_NORMS)) {
        return;
    }
    for (auto & i : res->inputs) {
        auto * inp = dynamic_cast<llm_graph_input_steer_route *>(i.get());
        if (!inp) {
            continue;
        }
        for (auto & kl : inp->layers) {
            if (kl.il == il) {
                ggml_tensor * x = ggml_is_contiguous(experts) ? experts : ggml_cont(ctx, experts);
                kl.norms = ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, x)));
                ggml_set_name(kl.norms, ("steer_route_norms-" + std::to_string(il)).c_str());
                ggml_set_output(kl.norms);
                ggml_build_forward_expand(gf, kl.norms);
                return;
            }
        }
    }
}

// the last layer's rows while routed rows need no logits (llama_steer_sel): out_ids lists
// them; out_of_sel, made when the output norm or the logits are cut, picks the outputs among them
class llm_graph_input_steer_sel : public llm_graph_input_i {
public:
    explicit llm_graph_input_steer_sel(std::shared_ptr<const llama_steer_sel> sel) : sel(std::move(sel)) {}

    void set_input(const llama_ubatch * ub) override {
        GGML_UNUSED(ub);
        ggml_backend_tensor_set(rows, sel->rows.data(), 0, ggml_nbytes(rows));
        if (out_of_sel && ggml_nelements(out_of_sel) > 0) {  // a decode may route rows and want no logits
            ggml_backend_tensor_set(out_of_sel, sel->out_of_sel.data(), 0, ggml_nbytes(out_of_sel));
        }
        if (back) {
            ggml_backend_tensor_set(back, sel->back.data(), 0, ggml_nbytes(back));
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        return rows->ne[0] == params.steer_route_nsel && (!out_of_sel || out_of_sel->ne[0] == (int64_t) params.n_outputs);
    }  // back has the size of rows

    std::shared_ptr<const llama_steer_sel> sel;
    ggml_tensor * rows = nullptr;       // I32 [n_sel]
    ggml_tensor * out_of_sel = nullptr; // I32 [n_outputs]
    ggml_tensor * back = nullptr;       // I32 [n_sel]
};

ggml_tensor * llama_steer_graph::inp_sel_rows(ggml_context * ctx) {
    if (!sel_inp) {
        auto inp = std::make_unique<llm_graph_input_steer_sel>(route->sel);
        inp->rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_sel);
        ggml_set_input(inp->rows);
        ggml_set_name(inp->rows, "out_ids"); // upstream's name: this is its out_ids, widened
        sel_inp = inp.get();
        res->add_input(std::move(inp));
    }
    return sel_inp->rows;
}

static ggml_tensor * outputs_of_sel(ggml_context * ctx, llama_steer_graph & g) {
    g.inp_sel_rows(ctx);
    if (!g.sel_inp->out_of_sel) {
        g.sel_inp->out_of_sel = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, g.n_outputs);
        ggml_set_input(g.sel_inp->out_of_sel);
        ggml_set_name(g.sel_inp->out_of_sel, "steer_out_of_sel");
    }
    return g.sel_inp->out_of_sel;
}

ggml_tensor * llama_steer_graph::cut_to_outputs(ggml_context * ctx, ggml_tensor * cur, const ggml_tensor * mw, int il) {
    // the output norm (every architecture names its weight "output_norm.weight") of hidden
    // states that still hold the routed rows: what follows is the output head
    if (il != -1 || !mw || std::strcmp(mw->name, "output_norm.weight") != 0 || ggml_n_dims(cur) > 2 ||
        cur->ne[1] != n_sel) {
        return cur;
    }
    return ggml_get_rows(ctx, cur, outputs_of_sel(ctx, *this));
}

ggml_tensor * llama_steer_graph::expert_rows(ggml_context * ctx, const ggml_tensor * cur) {
    // recording expert output norms: the routed rows need their experts computed too
    if (n_sel < 0 || ggml_n_dims(cur) > 2 || cur->ne[1] != n_sel || (route->flags & LLAMA_STEER_ROUTE_NORMS)) {
        return nullptr;
    }
    return outputs_of_sel(ctx, *this);
}

ggml_tensor * llama_steer_graph::expert_back(ggml_context * ctx) {
    inp_sel_rows(ctx);
    if (!sel_inp->back) {
        sel_inp->back = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_sel);
        ggml_set_input(sel_inp->back);
        ggml_set_name(sel_inp->back, "steer_back");
    }
    return sel_inp->back;
}

void llama_steer_graph::finish(ggml_context * ctx, ggml_cgraph * gf) {
    if (n_sel < 0 || !res) {
        return;
    }
    // an architecture whose output head does not start at build_norm(output_norm): the head
    // ran on every routed row; keep the output rows, which are what llama.cpp reads
    for (ggml_tensor ** t : {&res->t_logits, &res->t_embd}) {
        if (*t && ggml_n_dims(*t) <= 2 && (*t)->ne[1] == n_sel) {
            *t = ggml_get_rows(ctx, *t, outputs_of_sel(ctx, *this));
            ggml_build_forward_expand(gf, *t);
        }
    }
}

void llama_context::steer_route_prepare(const llama_ubatch & ubatch) {
    llama_steer_route & r = steer_route;
    r.sel_for.reset();
    r.n_sel = -1;
    if (!r.flags || r.want.empty() || !ubatch.data) {
        return;
    }
    llama_steer_sel & sel = *r.sel;
    sel.rows.clear();
    sel.out_of_sel.clear();
    sel.back.clear();
    sel.in_rows.assign(ubatch.n_tokens, 0);
    const bool have_idx = ubatch.data && ubatch.data->batch_idxs.size() == ubatch.n_tokens;
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        const size_t b = have_idx ? (size_t) ubatch.data->batch_idxs[i] : (size_t) i;
        const bool out = !ubatch.output || ubatch.output[i];
        if (out || (b < r.want.size() && r.want[b])) {
            sel.back.push_back(out ? (int32_t) sel.out_of_sel.size() : 0);
            if (out) {
                sel.out_of_sel.push_back((int32_t) sel.rows.size());
            }
            sel.in_rows[i] = 1;
            sel.rows.push_back((int32_t) i);
        }
    }
    if (sel.rows.size() > sel.out_of_sel.size()) {
        r.n_sel = (int64_t) sel.rows.size();
        r.sel_for = ubatch.data;
    }  // else: nothing routed beyond the outputs, upstream's rows
}

// queue one tensor's bytes for the host: asynchronously where its backend can
static void route_get(ggml_backend_sched_t sched, ggml_tensor * t, std::vector<char> & dst) {
    dst.resize(ggml_nbytes(t));
    if (dst.empty()) {
        return;
    }
    ggml_backend_t b = ggml_backend_sched_get_tensor_backend(sched, t);
    if (b) {
        ggml_backend_tensor_get_async(b, t, dst.data(), 0, dst.size());
    } else {
        ggml_backend_tensor_get(t, dst.data(), 0, dst.size());
    }
}

void llama_context::steer_route_extract(const llm_graph_result * res, const llama_ubatch & ubatch) {
    const llm_graph_input_steer_route * inp = nullptr;
    for (const auto & i : res->inputs) {
        if ((inp = dynamic_cast<const llm_graph_input_steer_route *>(i.get()))) {
            break;
        }
    }
    if (!inp) {
        steer_route.sel_for.reset();
        steer_route.n_sel = -1;
        return;  // the model routes nothing through build_moe_ffn
    }
    // a row's token: every token of the micro-batch, or (the last layer computes output rows
    // only, or outputs and routed rows) those tokens, in micro-batch order as out_ids lists them
    const bool have_idx = ubatch.data && ubatch.data->batch_idxs.size() == ubatch.n_tokens;
    std::vector<int32_t> all(ubatch.n_tokens), outs, outs_u;
    const bool sel = steer_route.sel_for == ubatch.data && steer_route.n_sel >= 0;
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        all[i] = have_idx ? ubatch.data->batch_idxs[i] : (int32_t) i;
        // with routed rows (llama_steer_sel) the last layer computes those and the outputs
        if (sel ? steer_route.sel->in_rows[i] : !ubatch.output || ubatch.output[i]) {
            outs.push_back(all[i]);
            outs_u.push_back((int32_t) i);
        }
    }
    // where tokens of one micro-batch take different K, a layer's top-k is the widest: each
    // row keeps its own token's K (the columns beyond carry weight 0 and are not its routing)
    const llama_adapter_steer * a = steer.get();
    const bool mixed_k = a && a->per_seq && a->any_topk();
    for (const auto & kl : inp->layers) {
        const int64_t n_rows = kl.ids->ne[1];
        if ((size_t) kl.il >= steer_route.layers.size()) {
            steer_route.layers.resize(kl.il + 1);
        }
        if (n_rows != (int64_t) all.size() && n_rows != (int64_t) outs.size()) {
            if (steer_route.error.empty()) {
                steer_route.error = "layer " + std::to_string(kl.il) + " routed " + std::to_string(n_rows) +
                    " rows of a micro-batch of " + std::to_string(all.size()) + " tokens with " +
                    std::to_string(outs.size()) + (sel ? " outputs and routed rows" : " outputs");
            }
            continue;
        }
        if (n_rows == 0) {
            continue;  // the last layer of a micro-batch without outputs
        }
        llama_steer_route_chunk c;
        c.n_rows = (int32_t) n_rows;
        c.k = (int32_t) kl.ids->ne[0];
        c.ids_row = kl.ids->nb[1];
        c.batch_idx = n_rows == (int64_t) all.size() ? all : outs;
        if (mixed_k) {
            c.row_k.resize(n_rows);
            for (int64_t r = 0; r < n_rows; ++r) {
                const uint32_t i = n_rows == (int64_t) all.size() ? (uint32_t) r : (uint32_t) outs_u[r];
                c.row_k[r] = std::min<int32_t>(c.k, a->k_of(a->table_of_token(ubatch, i), kl.il));
            }
        }
        route_get(sched.get(), kl.ids, c.ids);
        if (kl.w) {
            // [1, k, n] before normalization, [k, n] after
            const bool lead1 = kl.w->ne[0] == 1;
            c.w_elem = lead1 ? kl.w->nb[1] : kl.w->nb[0];
            c.w_row  = lead1 ? kl.w->nb[2] : kl.w->nb[1];
            route_get(sched.get(), kl.w, c.w);
        }
        if (kl.norms && kl.norms->ne[2] == n_rows && kl.norms->ne[1] == c.k) {
            route_get(sched.get(), kl.norms, c.norms);
        } else if (kl.norms && steer_route.error.empty()) {
            steer_route.error = "layer " + std::to_string(kl.il) + " computed expert outputs for " +
                std::to_string(kl.norms->ne[2]) + " of its " + std::to_string(n_rows) + " routed rows";
        }
        steer_route.layers[kl.il].push_back(std::move(c));
    }
    steer_route.sel_for.reset();  // this micro-batch is done: no other graph takes its rows
    steer_route.n_sel = -1;
}

// ---- context side -------------------------------------------------------------------------

void llama_context::steer_replace(std::shared_ptr<llama_adapter_steer> s) {
    // The last decode may still be running on the device (llama_decode returns before a GPU
    // backend finishes; only reading its outputs waits): wait for it before the old table's
    // buffers go. Freeing them under a running graph crashed llvmpipe (Mesa 25) in its shader
    // code, in the next prefill.
    ggml_backend_sched_synchronize(sched.get());
    steer = std::move(s);
    steer_gen++;  // the next decode rebuilds its graph instead of reusing a stale one
    sched_need_reserve = true;
}

void llama_context::steer_route_changed() {
    steer_route.sel_for.reset();
    steer_route.n_sel = -1;
    steer_gen++;  // no graph built with the other routing outputs is reused
    // and re-reserve: the allocator lays out a graph by the plan of the last reserve whenever
    // its nodes fit that plan, and a plan made without the kept outputs lets later layers
    // overwrite them (same nodes, only their output flags differ)
    sched_need_reserve = true;
}

void llama_context::steer_set_eval_callback(ggml_backend_sched_eval_callback cb, void * user_data) {
    cparams.cb_eval           = cb;
    cparams.cb_eval_user_data = user_data;
    // the callback is handed to the scheduler when a graph is built: force a rebuild
    gf_res_prev_active = nullptr;
    ggml_backend_sched_set_eval_callback(sched.get(), cb, user_data);
}

// the table a sequence's tokens take under the state's current layout
static int32_t table_of(const llama_steer_state & st, int32_t seq) {
    const int32_t slot = st.seq_slot[seq];
    return slot >= 0 ? st.slot_table[slot] : st.all_table;
}

static void size_state(llama_context * ctx, llama_steer_state & st) {
    if (st.seq_slot.empty()) {
        const uint32_t n_seq = std::max<uint32_t>(1, llama_n_seq_max(ctx));
        st.seq_slot.assign(n_seq, -1);
        st.slots.resize(LLAMA_STEER_MAX_SLOTS);
        st.slot_table.assign(LLAMA_STEER_MAX_SLOTS, 0);
        st.binds->seq_table.assign(n_seq, 0);
    }
}

// Build the adapter of a candidate state and install it; on failure the context keeps its
// state and adapter. Uniform while no slot holds a table: upstream's graph plus the steering
// nodes, and the selection-bias route that keeps fused kernels, exactly as API version 1.
static int32_t steer_commit(llama_context * ctx, llama_steer_state st) {
    const llama_model & model = ctx->get_model();
    const bool per_seq = std::any_of(st.slots.begin(), st.slots.end(), [](const auto & t) { return t.has_value(); });
    std::vector<const llama_adapter_steer::table *> tables;
    st.slot_table.assign(LLAMA_STEER_MAX_SLOTS, 0);
    st.all_table = 0;
    if (per_seq) {
        tables.push_back(nullptr);  // table 0: the identity, for tokens with no table
        if (st.all) {
            st.all_table = (int32_t) tables.size();
            tables.push_back(&*st.all);
        }
        for (int32_t s = 0; s < LLAMA_STEER_MAX_SLOTS; ++s) {
            if (st.slots[s]) {
                st.slot_table[s] = (int32_t) tables.size();
                tables.push_back(&*st.slots[s]);
            }
        }
    } else if (st.all) {
        tables.push_back(&*st.all);
    }

    std::shared_ptr<llama_adapter_steer> a;
    if (!tables.empty()) {
        a = std::make_shared<llama_adapter_steer>();
        if (!a->init(model, tables, per_seq, (int32_t) model.hparams.n_expert)) {
            return fail(LLAMA_STEER_ERR_ALLOC, "could not allocate the steering tensors");
        }
        bool any = false;
        for (int32_t il = 0; il < (int32_t) model.hparams.n_layer(); ++il) {
            any |= a->has_layer(il) || a->any_topk();
        }
        if (!any) {
            a.reset();  // tables that steer nothing are no tables
        }
    }
    // graphs of the adapter being replaced are never run again; the new one gets its own bindings
    st.binds = std::make_shared<llama_steer_binds>();
    st.binds->seq_table.resize(st.seq_slot.size());
    for (int32_t s = 0; s < (int32_t) st.seq_slot.size(); ++s) {
        st.binds->seq_table[s] = table_of(st, s);
    }
    if (a) {
        a->binds = st.binds;
    }
    ctx->steer_state = std::move(st);
    ctx->steer_replace(std::move(a));
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

// ---- C API --------------------------------------------------------------------------------

static int32_t validate(const llama_model & model, const int8_t * actions, const float * bias, const int32_t * topk,
                        int32_t n_layer, int32_t n_expert, float eps) {
    const auto & hp = model.hparams;
    if (n_layer != (int32_t) hp.n_layer() || n_expert != (int32_t) hp.n_expert || hp.n_expert == 0) {
        return fail(LLAMA_STEER_ERR_SHAPE,
            "table shape " + std::to_string(n_layer) + "x" + std::to_string(n_expert) +
            " does not match the model's " + std::to_string(hp.n_layer()) + " layers x " +
            std::to_string(hp.n_expert) + " experts");
    }
    if (!std::isfinite(eps) || eps < 0.0f) {
        return fail(LLAMA_STEER_ERR_NONFINITE, "eps must be finite and >= 0");
    }
    for (int32_t il = 0; il < n_layer; ++il) {
        const bool moe = model.layers[il].ffn_gate_inp != nullptr;
        const int32_t kk = topk ? topk[il] : 0;
        if (kk < 0 || kk > n_expert) {
            return fail(LLAMA_STEER_ERR_TOPK, "layer " + std::to_string(il) + ": " + std::to_string(kk) +
                " experts per token is outside 1.." + std::to_string(n_expert) + " (0: the model's k)");
        }
        if (kk > 0 && !moe) {
            return fail(LLAMA_STEER_ERR_NOT_MOE, "layer " + std::to_string(il) + " has no experts (dense layer): "
                "no experts per token to set");
        }
        // with expert groups the top K is taken among the selected groups' experts only
        const int64_t in_groups = hp.n_expert_groups > 1 ? (int64_t) hp.n_group_used * (n_expert / hp.n_expert_groups) : n_expert;
        if (kk > in_groups) {
            return fail(LLAMA_STEER_ERR_TOPK, "layer " + std::to_string(il) + ": " + std::to_string(kk) +
                " experts per token, but a token chooses among " + std::to_string(in_groups) + " (" +
                std::to_string(hp.n_group_used) + " of " + std::to_string(hp.n_expert_groups) + " expert groups)");
        }
        const int32_t k = kk > 0 ? kk : (int32_t) hp.n_expert_used(il);
        int32_t n_act = 0, n_deact = 0;
        for (int32_t e = 0; e < n_expert; ++e) {
            const size_t i = (size_t) il * n_expert + e;
            const int8_t a = actions[i];
            const std::string where = "layer " + std::to_string(il) + " expert " + std::to_string(e);
            if (a != LLAMA_STEER_NONE && a != LLAMA_STEER_ACTIVATE && a != LLAMA_STEER_DEACTIVATE) {
                return fail(LLAMA_STEER_ERR_ACTION, where + ": unknown action code " + std::to_string(a));
            }
            if (bias && !std::isfinite(bias[i])) {
                return fail(LLAMA_STEER_ERR_NONFINITE, where + ": bias is not finite");
            }
            const bool steered = a != LLAMA_STEER_NONE || (bias && bias[i] != 0.0f);
            if (steered && !moe) {
                return fail(LLAMA_STEER_ERR_NOT_MOE, where + ": layer " + std::to_string(il) + " has no experts (dense layer)");
            }
            n_act   += a == LLAMA_STEER_ACTIVATE;
            n_deact += a == LLAMA_STEER_DEACTIVATE;
        }
        if (n_act > k) {
            return fail(LLAMA_STEER_ERR_TOO_MANY, "layer " + std::to_string(il) + ": " + std::to_string(n_act) +
                " experts activated, more than the " + std::to_string(k) + " used per token");
        }
        if (n_expert - n_deact < k) {
            return fail(LLAMA_STEER_ERR_TOO_FEW, "layer " + std::to_string(il) + ": " + std::to_string(n_deact) +
                " experts deactivated leaves fewer than the " + std::to_string(k) + " used per token");
        }
    }
    return LLAMA_STEER_OK;
}

static llama_adapter_steer::table make_table(const int8_t * actions, const float * bias, const int32_t * topk,
                                              int32_t n_layer, int32_t n_expert, float eps) {
    const size_t n = (size_t) n_layer * n_expert;
    llama_adapter_steer::table t;
    t.actions.assign(actions, actions + n);
    if (bias) {
        t.bias.assign(bias, bias + n);
    }
    if (topk && std::any_of(topk, topk + n_layer, [](int32_t k) { return k > 0; })) {
        t.topk.assign(topk, topk + n_layer);
    }
    t.eps = eps;
    return t;
}

static bool bad_slot(int32_t slot, int32_t & rc) {
    if (slot < 0 || slot >= LLAMA_STEER_MAX_SLOTS) {
        rc = fail(LLAMA_STEER_ERR_SLOT, "slot " + std::to_string(slot) + " is outside [0, " +
                                        std::to_string(LLAMA_STEER_MAX_SLOTS) + ")");
        return true;
    }
    return false;
}

int32_t llama_steer_table_set(llama_context * ctx, int32_t slot, const int8_t * actions, const float * bias,
                              const int32_t * topk, int32_t n_layer, int32_t n_expert, float eps) {
    if (!ctx || !actions) {
        return fail(LLAMA_STEER_ERR_NULL, "null context or action table");
    }
    int32_t rc = LLAMA_STEER_OK;
    if (slot != -1 && bad_slot(slot, rc)) {
        return rc;
    }
    rc = validate(ctx->get_model(), actions, bias, topk, n_layer, n_expert, eps);
    if (rc != LLAMA_STEER_OK) {
        return rc;
    }
    llama_steer_state st = ctx->steer_state;
    size_state(ctx, st);
    (slot == -1 ? st.all : st.slots[slot]) = make_table(actions, bias, topk, n_layer, n_expert, eps);
    return steer_commit(ctx, std::move(st));
}

int32_t llama_steer_set(llama_context * ctx, const int8_t * actions, const float * bias,
                        int32_t n_layer, int32_t n_expert, float eps) {
    return llama_steer_table_set(ctx, -1, actions, bias, nullptr, n_layer, n_expert, eps);
}

void llama_steer_clear(llama_context * ctx) {
    if (ctx) {
        llama_steer_state st = ctx->steer_state;
        size_state(ctx, st);
        st.all.reset();
        steer_commit(ctx, std::move(st));
    }
}

int32_t llama_steer_slot_set(llama_context * ctx, int32_t slot, const int8_t * actions, const float * bias,
                             int32_t n_layer, int32_t n_expert, float eps) {
    if (slot == -1) {  // not the context-wide table: a slot index
        int32_t rc = LLAMA_STEER_OK;
        bad_slot(slot, rc);
        return rc;
    }
    return llama_steer_table_set(ctx, slot, actions, bias, nullptr, n_layer, n_expert, eps);
}

int32_t llama_steer_slot_clear(llama_context * ctx, int32_t slot) {
    if (!ctx) {
        return fail(LLAMA_STEER_ERR_NULL, "null context");
    }
    int32_t rc = LLAMA_STEER_OK;
    if (bad_slot(slot, rc)) {
        return rc;
    }
    llama_steer_state st = ctx->steer_state;
    size_state(ctx, st);
    if (!st.slots[slot]) {
        return LLAMA_STEER_OK;  // already empty: keep the graph
    }
    st.slots[slot].reset();
    return steer_commit(ctx, std::move(st));
}

int32_t llama_steer_seq_bind(llama_context * ctx, llama_seq_id seq_id, int32_t slot) {
    if (!ctx) {
        return fail(LLAMA_STEER_ERR_NULL, "null context");
    }
    llama_steer_state & st = ctx->steer_state;
    size_state(ctx, st);
    if (seq_id < 0 || (size_t) seq_id >= st.seq_slot.size()) {
        return fail(LLAMA_STEER_ERR_SEQ, "sequence id " + std::to_string(seq_id) + " is outside [0, " +
                                         std::to_string(st.seq_slot.size()) + ")");
    }
    int32_t rc = LLAMA_STEER_OK;
    if (slot != -1 && bad_slot(slot, rc)) {
        return rc;
    }
    st.seq_slot[seq_id] = slot;
    st.binds->seq_table[seq_id] = table_of(st, seq_id);
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

int32_t llama_steer_route_record(llama_context * ctx, int32_t flags) {
    if (!ctx) {
        return fail(LLAMA_STEER_ERR_NULL, "null context");
    }
    if (flags != 0 && (flags & ~(LLAMA_STEER_ROUTE_EXPERTS | LLAMA_STEER_ROUTE_WEIGHTS | LLAMA_STEER_ROUTE_NORMS) ||
                       !(flags & LLAMA_STEER_ROUTE_EXPERTS))) {
        return fail(LLAMA_STEER_ERR_ROUTE, "routing flags " + std::to_string(flags) +
                    ": LLAMA_STEER_ROUTE_EXPERTS, optionally | LLAMA_STEER_ROUTE_WEIGHTS | LLAMA_STEER_ROUTE_NORMS, or 0");
    }
    llama_steer_route & r = ctx->steer_route;
    if (r.flags == flags) {
        g_last_error.clear();
        return LLAMA_STEER_OK;  // same graph: nothing to rebuild
    }
    const llama_model & model = ctx->get_model();
    const int32_t n_layer = (int32_t) model.hparams.n_layer();
    const char * env = std::getenv("STEER_GGUF_PORTABLE_OPS");
    const bool portable = env && env[0] == '1';
    r.copy_layer.assign(n_layer, 0);
    for (int32_t il = 0; il < n_layer; ++il) {
        // as the steering op decides (llama_adapter_steer::init): a layer whose buffers are the
        // CPU backend's runs no fused kernels, so its routing tensors can be outputs in place;
        // STEER_GGUF_PORTABLE_OPS=1 takes the copy path on the CPU too, so CPU machines test it
        r.copy_layer[il] = !steer_local_cpu(model.select_buft(il)) || portable;
    }
    // the graph changes: let a running decode finish, rebuild the next graph, re-reserve
    ggml_backend_sched_synchronize(ctx->get_sched());
    r.flags = flags;
    ctx->steer_route_changed();
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

int32_t llama_steer_route_rows(llama_context * ctx, int32_t il, int32_t * k) {
    if (!ctx) {
        return fail(LLAMA_STEER_ERR_NULL, "null context");
    }
    llama_synchronize(ctx);  // the host copies of the last decode have landed
    const llama_steer_route & r = ctx->steer_route;
    if (!r.error.empty()) {
        return fail(LLAMA_STEER_ERR_ROUTE, "routing recorder: " + r.error);
    }
    if (il < 0 || (int32_t) ctx->get_model().hparams.n_layer() <= il) {
        return fail(LLAMA_STEER_ERR_ROUTE, "layer " + std::to_string(il) + " is outside the model's layers");
    }
    int32_t n = 0, kk = 0;
    if ((size_t) il < r.layers.size()) {
        for (const auto & c : r.layers[il]) {
            n += c.n_rows;
            kk = std::max(kk, c.k);
        }
    }
    if (k) {
        *k = kk;
    }
    g_last_error.clear();
    return n;
}

int32_t llama_steer_route_read(llama_context * ctx, int32_t il, int32_t * experts, float * weights,
                               int32_t * batch_idx, int32_t n_rows) {
    int32_t k = 0;
    const int32_t n = llama_steer_route_rows(ctx, il, &k);
    if (n < 0) {
        return n;
    }
    if (n != n_rows) {
        return fail(LLAMA_STEER_ERR_ROUTE, "layer " + std::to_string(il) + " holds " + std::to_string(n) +
                    " rows, " + std::to_string(n_rows) + " asked for");
    }
    if (n == 0) {
        return LLAMA_STEER_OK;
    }
    const auto & chunks = ctx->steer_route.layers[il];
    int64_t row = 0;
    for (const auto & c : chunks) {
        if (weights && c.w.empty()) {
            return fail(LLAMA_STEER_ERR_ROUTE, "layer " + std::to_string(il) +
                        ": weights were not recorded (LLAMA_STEER_ROUTE_WEIGHTS) in every decode since the last clear");
        }
        for (int32_t i = 0; i < c.n_rows; ++i, ++row) {
            // a row's own K first, then -1 (weight 0) up to the widest K recorded
            const int32_t kr = c.row_k.empty() ? c.k : c.row_k[i];
            std::memcpy(experts + row * k, c.ids.data() + i * c.ids_row, kr * sizeof(int32_t));
            std::fill(experts + row * k + kr, experts + (row + 1) * k, -1);
            if (weights) {
                for (int32_t j = 0; j < kr; ++j) {
                    std::memcpy(weights + row * k + j, c.w.data() + i * c.w_row + j * c.w_elem, sizeof(float));
                }
                std::fill(weights + row * k + kr, weights + (row + 1) * k, 0.0f);
            }
            if (batch_idx) {
                batch_idx[row] = c.batch_idx[i];
            }
        }
    }
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

int32_t llama_steer_route_read_norms(llama_context * ctx, int32_t il, float * norms, int32_t n_rows) {
    int32_t k = 0;
    const int32_t n = llama_steer_route_rows(ctx, il, &k);
    if (n < 0) {
        return n;
    }
    if (!norms || n != n_rows) {
        return fail(LLAMA_STEER_ERR_ROUTE, "layer " + std::to_string(il) + " holds " + std::to_string(n) +
                    " rows, " + std::to_string(n_rows) + " asked for" + (norms ? "" : " into no buffer"));
    }
    int64_t row = 0;
    for (const auto & c : ctx->steer_route.layers[il]) {
        if (c.norms.empty()) {
            return fail(LLAMA_STEER_ERR_ROUTE, "layer " + std::to_string(il) +
                        ": expert output norms were not recorded (LLAMA_STEER_ROUTE_NORMS) in every decode since the last clear");
        }
        const float * src = (const float *) c.norms.data();
        for (int32_t i = 0; i < c.n_rows; ++i, ++row) {
            const int32_t kr = c.row_k.empty() ? c.k : c.row_k[i];
            std::copy(src + (size_t) i * c.k, src + (size_t) i * c.k + kr, norms + row * k);
            std::fill(norms + row * k + kr, norms + (row + 1) * k, 0.0f);
        }
    }
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

int32_t llama_steer_route_tokens(llama_context * ctx, const int8_t * want, int32_t n_tokens) {
    if (!ctx) {
        return fail(LLAMA_STEER_ERR_NULL, "null context");
    }
    if (n_tokens < 0 || (n_tokens > 0 && !want)) {
        return fail(LLAMA_STEER_ERR_ROUTE, "route tokens: " + std::to_string(n_tokens) + " tokens" +
                    (want ? "" : " and no mask"));
    }
    ctx->steer_route.want.assign(want, want + n_tokens);
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

void llama_steer_route_clear(llama_context * ctx) {
    if (ctx) {
        llama_synchronize(ctx);  // no host copy may still be writing into what goes
        for (auto & l : ctx->steer_route.layers) {
            l.clear();
        }
        ctx->steer_route.error.clear();
    }
}

const char * llama_steer_last_error(void) {
    return g_last_error.c_str();
}

void llama_steer_set_eval_callback(llama_context * ctx, ggml_backend_sched_eval_callback cb, void * user_data) {
    if (ctx) {
        ctx->steer_set_eval_callback(cb, user_data);
    }
}

int32_t llama_steer_api_version(void) {
    return LLAMA_STEER_API_VERSION;
}

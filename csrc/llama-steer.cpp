// steer-gguf: the steering adapter and the C API, compiled into libllama.
#include "steer.h"
#include "llama-steer-adapter.h"

#include "llama-context.h"
#include "llama-model.h"

#include <cmath>
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

// x - mask*(x - extreme) puts masked experts exactly on the row extreme (up to rounding);
// the eps offsets and the bias then arrive in one add of a precomputed vector
ggml_tensor * llama_adapter_steer::steer(ggml_context * ctx, ggml_tensor * x, const layer & l, ggml_tensor * add) const {
    ggml_tensor * out = x;
    if (l.act) {
        ggml_tensor * mx = row_extreme(ctx, x, true);
        out = ggml_sub(ctx, out, ggml_mul(ctx, ggml_sub(ctx, x, mx), l.act));
    }
    if (l.deact) {
        ggml_tensor * mn = row_extreme(ctx, x, false);
        out = ggml_sub(ctx, out, ggml_mul(ctx, ggml_sub(ctx, x, mn), l.deact));
    }
    if (add) {
        out = ggml_add(ctx, out, add);
    }
    return out;
}

ggml_tensor * llama_adapter_steer::apply_logits(ggml_context * ctx, ggml_tensor * logits, int il) const {
    if (!has_layer(il)) {
        return logits;
    }
    if (!ggml_is_contiguous(logits)) {
        logits = ggml_cont(ctx, logits);
    }
    return steer(ctx, logits, layers[il], layers[il].add_logit);
}

ggml_tensor * llama_adapter_steer::apply_selection(ggml_context * ctx, ggml_tensor * scores, int il, bool grouped) const {
    const layer & l = layers[il];
    if (!has_layer(il) || (!l.act && !l.deact)) {
        return scores;
    }
    if (!ggml_is_contiguous(scores)) {
        scores = ggml_cont(ctx, scores);
    }
    if (grouped) {
        // group masking leaves -inf, and -inf * 0 would be NaN; 1e4 is far beyond any
        // sigmoid/softmax score plus selection bias, so finite scores are untouched
        scores = ggml_clamp(ctx, scores, -1e4f, 1e4f);
    }
    return steer(ctx, scores, l, l.add_sel);
}

bool llama_adapter_steer::init(const llama_model & model, const int8_t * actions, const float * bias,
                               int32_t n_expert, float eps) {
    const int32_t n_layer = (int32_t) model.hparams.n_layer();
    layers.assign(n_layer, layer{});

    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;
    auto ctx_for = [&](ggml_backend_buffer_type_t buft) -> ggml_context * {
        auto it = ctx_map.find(buft);
        if (it != ctx_map.end()) {
            return it->second;
        }
        ggml_init_params params = { 4 * (size_t) n_layer * ggml_tensor_overhead(), nullptr, true };
        ggml_context * c = ggml_init(params);
        if (c) {
            ctx_map[buft] = c;
            ctxs.emplace_back(c);
        }
        return c;
    };

    struct host_layer { std::vector<float> act, deact, add_logit, add_sel; };
    std::vector<host_layer> host(n_layer);

    for (int32_t il = 0; il < n_layer; ++il) {
        const int8_t * a = actions + (size_t) il * n_expert;
        const float  * b = bias ? bias + (size_t) il * n_expert : nullptr;
        bool any_act = false, any_deact = false, any_bias = false;
        for (int32_t e = 0; e < n_expert; ++e) {
            any_act   |= a[e] == LLAMA_STEER_ACTIVATE;
            any_deact |= a[e] == LLAMA_STEER_DEACTIVATE;
            any_bias  |= b && b[e] != 0.0f;
        }
        if (!any_act && !any_deact && !any_bias) {
            continue;  // no nodes at all for this layer
        }
        ggml_context * c = ctx_for(model.select_buft(il));
        if (!c) {
            return false;
        }
        host_layer & h = host[il];
        h.act.assign(n_expert, 0.0f);
        h.deact.assign(n_expert, 0.0f);
        h.add_logit.assign(n_expert, 0.0f);
        h.add_sel.assign(n_expert, 0.0f);
        for (int32_t e = 0; e < n_expert; ++e) {
            const float off = a[e] == LLAMA_STEER_ACTIVATE ? eps : a[e] == LLAMA_STEER_DEACTIVATE ? -eps : 0.0f;
            h.act[e]       = a[e] == LLAMA_STEER_ACTIVATE   ? 1.0f : 0.0f;
            h.deact[e]     = a[e] == LLAMA_STEER_DEACTIVATE ? 1.0f : 0.0f;
            h.add_sel[e]   = off;
            h.add_logit[e] = off + (b ? b[e] : 0.0f);
        }
        layer & l = layers[il];
        if (any_act)   { l.act   = ggml_new_tensor_1d(c, GGML_TYPE_F32, n_expert); }
        if (any_deact) { l.deact = ggml_new_tensor_1d(c, GGML_TYPE_F32, n_expert); }
        l.add_logit = ggml_new_tensor_1d(c, GGML_TYPE_F32, n_expert);
        l.add_sel   = ggml_new_tensor_1d(c, GGML_TYPE_F32, n_expert);
    }

    for (auto & [buft, c] : ctx_map) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
        if (!buf) {
            return false;
        }
        bufs.emplace_back(buf);
    }

    for (int32_t il = 0; il < n_layer; ++il) {
        layer & l = layers[il];
        const host_layer & h = host[il];
        const size_t nb = (size_t) n_expert * sizeof(float);
        if (l.act)       { ggml_backend_tensor_set(l.act,       h.act.data(),       0, nb); }
        if (l.deact)     { ggml_backend_tensor_set(l.deact,     h.deact.data(),     0, nb); }
        if (l.add_logit) { ggml_backend_tensor_set(l.add_logit, h.add_logit.data(), 0, nb); }
        if (l.add_sel)   { ggml_backend_tensor_set(l.add_sel,   h.add_sel.data(),   0, nb); }
    }
    return true;
}

// ---- context side -------------------------------------------------------------------------

void llama_context::steer_replace(std::shared_ptr<llama_adapter_steer> s) {
    steer = std::move(s);
    steer_gen++;  // the next decode rebuilds its graph instead of reusing a stale one
    sched_need_reserve = true;
}

void llama_context::steer_set_eval_callback(ggml_backend_sched_eval_callback cb, void * user_data) {
    cparams.cb_eval           = cb;
    cparams.cb_eval_user_data = user_data;
    // the callback is handed to the scheduler when a graph is built: force a rebuild
    gf_res_prev_active = nullptr;
    ggml_backend_sched_set_eval_callback(sched.get(), cb, user_data);
}

// ---- C API --------------------------------------------------------------------------------

int32_t llama_steer_set(llama_context * ctx, const int8_t * actions, const float * bias,
                        int32_t n_layer, int32_t n_expert, float eps) {
    if (!ctx || !actions) {
        return fail(LLAMA_STEER_ERR_NULL, "null context or action table");
    }
    const llama_model & model = ctx->get_model();
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
        const int32_t k = (int32_t) hp.n_expert_used(il);
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

    auto s = std::make_shared<llama_adapter_steer>();
    if (!s->init(model, actions, bias, n_expert, eps)) {
        return fail(LLAMA_STEER_ERR_ALLOC, "could not allocate the steering tensors");
    }
    bool any = false;
    for (int32_t il = 0; il < n_layer; ++il) {
        any |= s->has_layer(il);
    }
    ctx->steer_replace(any ? std::move(s) : nullptr);  // an empty table is no table
    g_last_error.clear();
    return LLAMA_STEER_OK;
}

void llama_steer_clear(llama_context * ctx) {
    if (ctx) {
        ctx->steer_replace(nullptr);
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

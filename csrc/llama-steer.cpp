// steer-gguf: the steering adapter and the C API, compiled into libllama.
#include "steer.h"
#include "llama-steer-adapter.h"
#include "steer-rule.h"

#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
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

// the CPU op: userdata packs the add row (bits 0-1), any_act (2), any_deact (3), clamp (4)
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

ggml_tensor * llama_adapter_steer::steer(ggml_context * ctx, ggml_tensor * x, const layer & l, int add_row,
                                         bool clamp) const {
    if (l.on_cpu) {
        // one node instead of a dozen: on the CPU every node costs a barrier between threads,
        // which is most of what a one-token decode spends on these tiny rows
        if (x->nb[0] != sizeof(float)) {
            x = ggml_cont(ctx, x);
        }
        const intptr_t f = add_row | (l.any_act << 2) | (l.any_deact << 3) | ((intptr_t) clamp << 4);
        return ggml_map_custom2(ctx, x, l.coef, steer_cpu_op, GGML_N_TASKS_MAX, (void *) f);
    }
    // GPU backends: the rule of steer-rule.h as ggml ops, same arithmetic in the same order;
    // x - mask*(x - extreme) puts masked experts exactly on the row extreme
    const int64_t n = l.coef->ne[0];
    auto row = [&](int r) { return ggml_view_1d(ctx, l.coef, n, r * l.coef->nb[1]); };
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

ggml_tensor * llama_adapter_steer::apply_logits(ggml_context * ctx, ggml_tensor * logits, int il) const {
    if (!has_layer(il)) {
        return logits;
    }
    return steer(ctx, logits, layers[il], STEER_ADD_LOGIT, false);
}

ggml_tensor * llama_adapter_steer::apply_selection(ggml_context * ctx, ggml_tensor * scores, int il, bool grouped) const {
    if (!has_layer(il) || (!layers[il].any_act && !layers[il].any_deact)) {
        return scores;  // a bias alone steers the logits only
    }
    return steer(ctx, scores, layers[il], STEER_ADD_SEL, grouped);
}

ggml_tensor * llama_adapter_steer::selection_bias(int il, const ggml_tensor * exp_probs_b) const {
    if (!has_layer(il) || exp_probs_b == nullptr || layers[il].sel_bias_src != exp_probs_b) {
        return nullptr;
    }
    return layers[il].sel_bias;
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
    std::vector<std::vector<float>> host(n_layer);
    std::vector<std::vector<float>> host_bias(n_layer);
    for (int32_t il = 0; il < n_layer; ++il) {
        const int8_t * a = actions + (size_t) il * n_expert;
        const float  * b = bias ? bias + (size_t) il * n_expert : nullptr;
        layer & l = layers[il];
        host[il].resize((size_t) STEER_N_ROWS * n_expert);
        const steer_flags f = steer_coefficients(a, b, n_expert, eps, host[il].data());
        if (!f.any()) {
            continue;  // no nodes at all for this layer
        }
        l.any_act   = f.act;
        l.any_deact = f.deact;
        ggml_backend_buffer_type_t buft = model.select_buft(il);
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        // only the CPU backend runs the custom op (its buffer type names no device);
        // host-visible GPU buffers (CUDA pinned, Metal shared) belong to backends that do not.
        // STEER_GGUF_PORTABLE_OPS=1 forces the GPU op chain on the CPU too, so that machines
        // without a GPU can test what GPUs run.
        l.on_cpu = ggml_backend_buft_is_host(buft) && (!dev || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) &&
                   !portable;
        ggml_context * c = ctx_for(buft);
        if (!c) {
            return false;
        }
        l.coef = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_expert, STEER_N_ROWS);

        // a selection bias (DeepSeek-V3 style): the graph adds it to gating scores in [0, 1]
        // before the top-k, so forcing an expert on or off is a bias of max + 2 or min - 2,
        // and the gating -> add -> top-k pattern that backends fuse stays intact
        const ggml_tensor * b_src = model.layers[il].ffn_exp_probs_b;
        if ((f.act || f.deact) && b_src && b_src->type == GGML_TYPE_F32 && ggml_nelements(b_src) == n_expert &&
            ggml_is_contiguous(b_src)) {
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
    }
    return true;
}

// ---- context side -------------------------------------------------------------------------

void llama_context::steer_replace(std::shared_ptr<llama_adapter_steer> s) {
    // The table being replaced stays alive until the next replacement, so at least one graph
    // runs without it before its buffers are freed: freeing it at once crashed llvmpipe (Mesa 25,
    // ggml-vulkan) in the next prefill, inside a shader. Clearing installs an empty table (no
    // layers: no graph nodes, upstream's graph) only to hold the old one.
    auto next = s ? std::move(s) : std::make_shared<llama_adapter_steer>();
    if (steer) {
        steer->prev.reset();
    }
    next->prev = std::move(steer);
    steer = std::move(next);
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

// Per-context steering tensors, kept on each layer's own device like llama.cpp's
// control-vector adapter, so the graph never copies the table between backends.
#pragma once

#include "ggml.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <memory>
#include <vector>

struct llama_model;

struct llama_adapter_steer {
    struct layer {
        ggml_tensor * coef = nullptr; // [n_expert, STEER_N_ROWS] (steer-rule.h); null: layer unsteered
        bool any_act   = false;
        bool any_deact = false;
        bool on_cpu    = false;       // the layer lives on the CPU backend: steer with one fused op
        // the model's selection bias with the table applied (activated: max + 2, deactivated:
        // min - 2), and the model tensor it was made from; null where the layer has none
        ggml_tensor * sel_bias = nullptr;
        const ggml_tensor * sel_bias_src = nullptr;
    };

    std::vector<layer> layers; // by real layer index
    std::shared_ptr<llama_adapter_steer> prev; // the table this one replaced (llama-steer.cpp)

    bool has_layer(int il) const {
        return il >= 0 && (size_t) il < layers.size() && layers[il].coef != nullptr;
    }

    ggml_tensor * apply_logits(ggml_context * ctx, ggml_tensor * logits, int il) const;
    ggml_tensor * apply_selection(ggml_context * ctx, ggml_tensor * scores, int il, bool grouped) const;
    // the steered selection bias to add in place of exp_probs_b, or null (steer the scores instead)
    ggml_tensor * selection_bias(int il, const ggml_tensor * exp_probs_b) const;

    // builds the tensors from a validated table; false if a buffer cannot be allocated
    bool init(const llama_model & model, const int8_t * actions, const float * bias,
              int32_t n_expert, float eps);

private:
    ggml_tensor * steer(ggml_context * ctx, ggml_tensor * x, const layer & l, int add_row, bool clamp) const;

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

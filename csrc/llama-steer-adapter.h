// Per-context steering tensors, kept on each layer's own device like llama.cpp's
// control-vector adapter, so the graph never copies the table between backends.
#pragma once

#include "ggml.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <vector>

struct llama_model;

struct llama_adapter_steer {
    struct layer {
        ggml_tensor * act       = nullptr; // [n_expert] 1 where activated, else 0
        ggml_tensor * deact     = nullptr; // [n_expert] 1 where deactivated, else 0
        ggml_tensor * add_logit = nullptr; // [n_expert] eps*act - eps*deact + bias
        ggml_tensor * add_sel   = nullptr; // [n_expert] eps*act - eps*deact
    };

    std::vector<layer> layers; // by real layer index; empty entries for unsteered layers

    bool has_layer(int il) const {
        return il >= 0 && (size_t) il < layers.size() &&
               (layers[il].act || layers[il].deact || layers[il].add_logit);
    }

    ggml_tensor * apply_logits(ggml_context * ctx, ggml_tensor * logits, int il) const;
    ggml_tensor * apply_selection(ggml_context * ctx, ggml_tensor * scores, int il, bool grouped) const;

    // builds the tensors from a validated table; false if a buffer cannot be allocated
    bool init(const llama_model & model, const int8_t * actions, const float * bias,
              int32_t n_expert, float eps);

private:
    ggml_tensor * steer(ggml_context * ctx, ggml_tensor * x, const layer & l, ggml_tensor * add) const;

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

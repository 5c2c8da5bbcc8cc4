// steer-gguf C API: per-context expert steering for llama.cpp's MoE gating.
//
// The table is indexed [layer][expert] over all of the model's layers (dense layers must
// carry no steering). Steering rule, applied to router logits before the gating function
// (softmax / sigmoid / softmax-after-top-k) and, where a selection bias or expert groups
// make selection scores differ from the logits, to those scores too:
//   activate:   logit := max(row) + eps
//   deactivate: logit := min(row) - eps
//   then:       logit += bias   (router logits only)
// Nothing here aborts: every invalid input returns a negative code and leaves the
// previous table in place.
#pragma once

#include "llama.h"
#include "ggml-backend.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMA_STEER_API_VERSION 1

enum llama_steer_action {
    LLAMA_STEER_NONE       = 0,
    LLAMA_STEER_ACTIVATE   = 1,
    LLAMA_STEER_DEACTIVATE = 2,
};

enum llama_steer_status {
    LLAMA_STEER_OK             =  0,
    LLAMA_STEER_ERR_NULL       = -1, // null context or table
    LLAMA_STEER_ERR_SHAPE      = -2, // n_layer / n_expert differ from the model
    LLAMA_STEER_ERR_ACTION     = -3, // action code not in llama_steer_action
    LLAMA_STEER_ERR_NOT_MOE    = -4, // steering on a layer without experts
    LLAMA_STEER_ERR_TOO_MANY   = -5, // more activated experts than experts per token
    LLAMA_STEER_ERR_TOO_FEW    = -6, // fewer than experts-per-token left after deactivation
    LLAMA_STEER_ERR_NONFINITE  = -7, // NaN/inf in eps or bias, or eps < 0
    LLAMA_STEER_ERR_ALLOC      = -8, // backend buffer allocation failed
};

// actions: int8 [n_layer * n_expert], row-major by layer; bias: float [n_layer * n_expert] or NULL.
LLAMA_API int32_t llama_steer_set(
        struct llama_context * ctx,
        const int8_t * actions,
        const float  * bias,
        int32_t        n_layer,
        int32_t        n_expert,
        float          eps);

// Back to upstream routing: the next graph has no steering nodes at all.
LLAMA_API void llama_steer_clear(struct llama_context * ctx);

// Message for the last error of this thread (names the layer / expert at fault).
LLAMA_API const char * llama_steer_last_error(void);

// Install (or, with cb == NULL, remove) the scheduler's eval callback on a live context.
LLAMA_API void llama_steer_set_eval_callback(
        struct llama_context * ctx,
        ggml_backend_sched_eval_callback cb,
        void * user_data);

LLAMA_API int32_t llama_steer_api_version(void);

#ifdef __cplusplus
}
#endif

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
//
// Per-sequence steering (API version 2): a context also holds LLAMA_STEER_MAX_SLOTS slots,
// each with a table or empty, and binds each sequence id to a slot or to none. A token takes
// the table of the slot its sequence (its first sequence id) is bound to; an unbound
// sequence takes the context-wide table of llama_steer_set, or none. Tokens that end up with
// no table are routed exactly as upstream, bit for bit. Binding reads the sequence ids of each
// micro-batch through a graph input: rebinding between two decodes (say, from a prompt to its
// first generated token) never rebuilds the graph; setting or clearing a table does.
// While any slot holds a table, layers with a selection bias steer the selection scores
// rather than the bias, so those layers leave the backends' fused top-k kernel.
#pragma once

#include "llama.h"
#include "ggml-backend.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMA_STEER_API_VERSION 5
#define LLAMA_STEER_MAX_SLOTS   64

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
    LLAMA_STEER_ERR_SLOT       = -9, // slot index outside [0, LLAMA_STEER_MAX_SLOTS)
    LLAMA_STEER_ERR_SEQ        = -10, // sequence id outside [0, the context's n_seq_max)
    LLAMA_STEER_ERR_ROUTE      = -11, // routing flags, layer or row count not as recorded
    LLAMA_STEER_ERR_TOPK       = -12, // experts per token out of range
};

// what llama_steer_route_record keeps of every MoE layer
enum llama_steer_route_flags {
    LLAMA_STEER_ROUTE_EXPERTS = 1, // the selected experts (required)
    LLAMA_STEER_ROUTE_WEIGHTS = 2, // and their final weights
    LLAMA_STEER_ROUTE_NORMS   = 4, // and the L2 norm of each selected expert's output (API version 5)
};

// actions: int8 [n_layer * n_expert], row-major by layer; bias: float [n_layer * n_expert] or NULL.
LLAMA_API int32_t llama_steer_set(
        struct llama_context * ctx,
        const int8_t * actions,
        const float  * bias,
        int32_t        n_layer,
        int32_t        n_expert,
        float          eps);

// The context-wide table goes (slots and bindings stay); with no slot table either, the
// next graph has no steering nodes at all: upstream routing.
LLAMA_API void llama_steer_clear(struct llama_context * ctx);

// Put a table in a slot (validated like llama_steer_set); sequences bound to it take it from
// the next decode on.
LLAMA_API int32_t llama_steer_slot_set(
        struct llama_context * ctx,
        int32_t        slot,
        const int8_t * actions,
        const float  * bias,
        int32_t        n_layer,
        int32_t        n_expert,
        float          eps);

// Empty a slot: sequences bound to it are not steered.
LLAMA_API int32_t llama_steer_slot_clear(struct llama_context * ctx, int32_t slot);

// Bind a sequence to a slot, or unbind it with slot = -1. Cheap: no graph rebuild.
LLAMA_API int32_t llama_steer_seq_bind(struct llama_context * ctx, llama_seq_id seq_id, int32_t slot);

// ---- experts per token (API version 4) ------------------------------------------------------
// llama_steer_set (slot = -1) or llama_steer_slot_set with, per layer, how many experts each
// token takes: topk int32 [n_layer], 0 = the model's own k there; topk = NULL is those two
// functions. A layer with K is built with K in place of the model's k: the top K of the
// (steered) selection scores, weights computed over those K as the model computes them over
// its k (normalisation, softmax after top-k, scaling), so K everywhere routes like the model
// loaded with expert_used_count = K, and a smaller K reads fewer expert weights. Activated
// experts count inside K; deactivation must leave K. With expert groups, K counts the experts
// of the selected groups (at most n_group_used * n_expert / n_expert_groups). Layers whose
// experts come from a fixed table (hash routing) keep them: K is not applied there.
// K is per table, so per sequence: each token takes the K of its table (an unbound sequence's
// tokens the context-wide table's, or the model's k). A micro-batch whose tokens all take one K
// is built with that K; one whose tokens differ is built with the widest, and each token's
// weights are computed over its own K exactly as a graph of that K computes them, the experts
// beyond it weighted 0: each sequence routes as in a context of its own K (but reads the widest
// K's expert weights). The routing recorder gives each row its own K experts, then -1.
LLAMA_API int32_t llama_steer_table_set(
        struct llama_context * ctx,
        int32_t        slot,
        const int8_t * actions,
        const float  * bias,
        const int32_t * topk,
        int32_t        n_layer,
        int32_t        n_expert,
        float          eps);

// Message for the last error of this thread (names the layer / expert at fault).
LLAMA_API const char * llama_steer_last_error(void);

// Install (or, with cb == NULL, remove) the scheduler's eval callback on a live context.
LLAMA_API void llama_steer_set_eval_callback(
        struct llama_context * ctx,
        ggml_backend_sched_eval_callback cb,
        void * user_data);

// ---- routing recorded by the graph (API version 3) ------------------------------------------
// While a context records, its graph keeps every MoE layer's selected experts (and, with
// LLAMA_STEER_ROUTE_WEIGHTS, their final weights: after normalization and scaling, as the
// experts' outputs are mixed) as graph outputs, the way it keeps logits; after each
// micro-batch they are queued for host memory (asynchronously where the backend allows), and
// the first read after a decode synchronizes once. No eval callback is involved, so a
// caller's own callback still works. Graphs are reused while the flags stay the same; with
// flags 0 the graph is upstream's again.
//
// Rows accumulate over decodes until llama_steer_route_clear, per layer in the order the
// graph computed them: every token of each micro-batch, except in the last layer, which
// llama.cpp computes for output tokens only (batch.logits[i] != 0), and for the tokens of
// llama_steer_route_tokens. Each row carries its token's index in the batch of the
// llama_decode that computed it.

// Start (flags: LLAMA_STEER_ROUTE_EXPERTS, optionally | LLAMA_STEER_ROUTE_WEIGHTS) or stop
// (flags 0) recording, from the next decode on; rows already recorded stay.
LLAMA_API int32_t llama_steer_route_record(struct llama_context * ctx, int32_t flags);

// Rows recorded in layer il (0 for a dense layer), or a negative status; k (may be NULL)
// receives the most experts per token of any of its rows. Waits for the device.
LLAMA_API int32_t llama_steer_route_rows(struct llama_context * ctx, int32_t il, int32_t * k);

// Copy layer il's n_rows rows (n_rows must be what llama_steer_route_rows says): experts int32
// [n_rows * k]; weights float [n_rows * k] or NULL; batch_idx int32 [n_rows] or NULL. k is the
// most experts per token of any row since the last clear (tables with K, steer.h version 4): a
// row with fewer lists its own first, then -1 with weight 0.
LLAMA_API int32_t llama_steer_route_read(
        struct llama_context * ctx,
        int32_t    il,
        int32_t  * experts,
        float    * weights,
        int32_t  * batch_idx,
        int32_t    n_rows);

// Layer il's expert output norms (recorded with LLAMA_STEER_ROUTE_NORMS): float [n_rows * k],
// row for row and column for column as llama_steer_route_read's experts, each the L2 norm of
// that expert's output for that token before its weight multiplies it (0 where the expert is
// -1). REAP's saliency of an expert is the mean of weight x norm over the tokens routed to it.
// While norms are recorded the last layer computes its experts for routed rows too.
LLAMA_API int32_t llama_steer_route_read_norms(struct llama_context * ctx, int32_t il, float * norms, int32_t n_rows);

// Tokens to route in every layer although they are not outputs: want[i] != 0 for the token
// at batch index i of each following llama_decode (NULL / 0 tokens: outputs only, upstream's
// rows). llama.cpp computes the last layer only for the rows it keeps; these rows are kept
// through the last layer's attention and router (their routing), skip its experts when it is
// a MoE layer (build_moe_ffn computes them for output rows only), and are cut just before the
// output head: no logits, no room in the logits buffer. A decode may have no output at all.
// In force until changed; used only while recording. (The last layer's other per-row work,
// e.g. shared experts, runs for them too: it is each architecture's own graph code.)
LLAMA_API int32_t llama_steer_route_tokens(struct llama_context * ctx, const int8_t * want, int32_t n_tokens);

// Drop every recorded row (waits for copies still in flight). Recording goes on.
LLAMA_API void llama_steer_route_clear(struct llama_context * ctx);

LLAMA_API int32_t llama_steer_api_version(void);

#ifdef __cplusplus
}
#endif

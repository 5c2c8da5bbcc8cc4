// steer-gguf: the steering rule, in one place.
//
// Per token, over one layer's router row x[0..n_expert):
//   y = x - act * (x - max(x)) - deact * (x - min(x)) + add
// so an activated expert lands on max + eps and a deactivated one on min - eps, where
//   add = eps*act - eps*deact + bias   on the router logits,
//   add = eps*act - eps*deact          on the selection scores (no bias there).
// The CPU graph op and the hook engine call steer_row(); the portable ggml-op chain that
// GPU backends run (llama-steer.cpp) computes the same arithmetic in the same order, so
// every engine rounds the same way.
#pragma once

#include "steer.h"

#include <algorithm>
#include <cstdint>

enum steer_coef_row {
    STEER_ACT       = 0,
    STEER_DEACT     = 1,
    STEER_ADD_LOGIT = 2,
    STEER_ADD_SEL   = 3,
    STEER_N_ROWS    = 4,
};

// what a layer's table asks for: no flag set means the layer is not steered at all
struct steer_flags {
    bool act   = false;
    bool deact = false;
    bool bias  = false;
    bool any() const { return act || deact || bias; }
};

// coef: [STEER_N_ROWS][n_expert], from one layer's actions and (optional) bias
inline steer_flags steer_coefficients(const int8_t * actions, const float * bias, int n_expert, float eps,
                                      float * coef) {
    steer_flags f;
    for (int e = 0; e < n_expert; ++e) {
        const bool a = actions[e] == LLAMA_STEER_ACTIVATE;
        const bool d = actions[e] == LLAMA_STEER_DEACTIVATE;
        const float off = a ? eps : d ? -eps : 0.0f;
        coef[STEER_ACT       * n_expert + e] = a ? 1.0f : 0.0f;
        coef[STEER_DEACT     * n_expert + e] = d ? 1.0f : 0.0f;
        coef[STEER_ADD_SEL   * n_expert + e] = off;
        coef[STEER_ADD_LOGIT * n_expert + e] = off + (bias ? bias[e] : 0.0f);
        f.act   |= a;
        f.deact |= d;
        f.bias  |= bias && bias[e] != 0.0f;
    }
    return f;
}

// Grouped selection scores carry -inf for masked groups, and -inf * 0 would be NaN; 1e4 is
// far beyond any sigmoid/softmax score plus selection bias, so finite scores are untouched.
constexpr float STEER_CLAMP = 1e4f;

// y may alias x
inline void steer_row(const float * x, float * y, int n, const float * coef, int add_row,
                      bool any_act, bool any_deact, bool clamp) {
    auto in = [&](int e) { return clamp ? std::clamp(x[e], -STEER_CLAMP, STEER_CLAMP) : x[e]; };
    float mx = in(0), mn = in(0);
    for (int e = 1; e < n; ++e) {
        mx = std::max(mx, in(e));
        mn = std::min(mn, in(e));
    }
    const float * act   = coef + STEER_ACT   * n;
    const float * deact = coef + STEER_DEACT * n;
    const float * add   = coef + add_row     * n;
    for (int e = 0; e < n; ++e) {
        const float xe = in(e);
        float out = xe;
        if (any_act)   { out = out - (xe - mx) * act[e]; }
        if (any_deact) { out = out - (xe - mn) * deact[e]; }
        y[e] = out + add[e];
    }
}

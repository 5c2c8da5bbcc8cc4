// steer_gguf._native: the bridge between Python and the patched libllama.
// Holds what must run inside llama.cpp's compute loop without the GIL: the eval-callback
// routing recorder (the test oracle of the graph's own routing outputs) and the hook engine
// (steering by rewriting tensors in the eval callback).
#include "steer.h"
#include "steer-rule.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace py = pybind11;

static llama_context * as_ctx(uintptr_t p) { return reinterpret_cast<llama_context *>(p); }

static py::tuple status(int32_t rc) {
    return py::make_tuple((int) rc, std::string(rc == LLAMA_STEER_OK ? "" : llama_steer_last_error()));
}

// "ffn_moe_topk-12" -> ("ffn_moe_topk", 12); names without a layer give -1
static std::pair<std::string, int> split_name(const char * name) {
    const char * dash = std::strrchr(name, '-');
    if (!dash || dash[1] == '\0') {
        return {name, -1};
    }
    char * end = nullptr;
    long il = std::strtol(dash + 1, &end, 10);
    if (*end != '\0') {
        return {name, -1};
    }
    return {std::string(name, dash - name), (int) il};
}

static bool is_weights_name(const std::string & base) {
    return base == "ffn_moe_weights" || base == "ffn_moe_weights_softmax" ||
           base == "ffn_moe_weights_norm" || base == "ffn_moe_weights_scaled";
}

struct Observer {
    int n_layer;
    // recorder: per layer, rows of k selected experts / weights in token order
    bool record = false;
    // every observed tensor splits the graph's compute in two: detection needs the experts
    // only, so it skips the weights and pays one split per layer instead of two
    bool record_weights = true;
    std::vector<std::vector<int32_t>> experts;
    std::vector<std::vector<float>>   weights;
    std::vector<int> k_of;
    // hook engine
    bool hook = false;
    int n_expert = 0;
    bool grouped = false;
    std::string logit_stage, select_stage;
    std::vector<float> coef;  // [n_layer][STEER_N_ROWS][n_expert], see steer-rule.h
    std::vector<char> layer_steered, layer_act, layer_deact;
    std::string error;

    std::vector<char> scratch;

    explicit Observer(int n_layer) : n_layer(n_layer), experts(n_layer), weights(n_layer), k_of(n_layer, 0),
                                     layer_steered(n_layer, 0), layer_act(n_layer, 0), layer_deact(n_layer, 0) {}

    bool wants(const std::string & base, int il) const {
        if (il < 0 || il >= n_layer) {
            return false;
        }
        if (record && (base == "ffn_moe_topk" || (record_weights && is_weights_name(base)))) {
            return true;
        }
        if (hook && layer_steered[il] && (base == logit_stage || (!select_stage.empty() && base == select_stage))) {
            return true;
        }
        return false;
    }

    void on_tensor(ggml_tensor * t, const std::string & base, int il) {
        const size_t nbytes = ggml_nbytes(t);
        scratch.resize(nbytes);
        ggml_backend_tensor_get(t, scratch.data(), 0, nbytes);
        const char * data = scratch.data();

        if (base == "ffn_moe_topk") {
            if (t->type != GGML_TYPE_I32) { error = "ffn_moe_topk is not int32"; return; }
            const int64_t k = t->ne[0], n_tok = t->ne[1];
            k_of[il] = (int) k;
            auto & dst = experts[il];
            for (int64_t i = 0; i < n_tok; ++i) {
                const int32_t * row = (const int32_t *) (data + i * t->nb[1]);
                dst.insert(dst.end(), row, row + k);
            }
            weights[il].resize(dst.size(), 0.0f);  // filled by the weights tensor that follows
            return;
        }
        if (is_weights_name(base)) {
            if (t->type != GGML_TYPE_F32) { error = base + " is not f32"; return; }
            // [1, k, T] before normalization, [k, T] after
            const bool lead1 = t->ne[0] == 1;
            const int64_t k = lead1 ? t->ne[1] : t->ne[0];
            const int64_t n_tok = lead1 ? t->ne[2] : t->ne[1];
            const size_t se = lead1 ? t->nb[1] : t->nb[0];
            const size_t st = lead1 ? t->nb[2] : t->nb[1];
            auto & dst = weights[il];
            if ((int64_t) dst.size() < n_tok * k) { error = "weights before top-k in layer " + std::to_string(il); return; }
            float * out = dst.data() + dst.size() - n_tok * k;  // the block of the latest top-k
            for (int64_t i = 0; i < n_tok; ++i) {
                for (int64_t j = 0; j < k; ++j) {
                    out[i * k + j] = *(const float *) (data + i * st + j * se);
                }
            }
            return;
        }
        // hook engine: the rule of steer-rule.h, as the graph engine applies it
        if (t->type != GGML_TYPE_F32 || t->ne[0] != n_expert || !ggml_is_contiguous(t)) {
            error = "cannot hook " + base + "-" + std::to_string(il) + ": unexpected layout";
            return;
        }
        const bool sel = base == select_stage && base != logit_stage;
        if (sel && !layer_act[il] && !layer_deact[il]) {
            return;
        }
        const float * c = coef.data() + (size_t) il * STEER_N_ROWS * n_expert;
        for (int64_t i = 0; i < t->ne[1]; ++i) {
            float * row = (float *) (scratch.data() + i * t->nb[1]);
            steer_row(row, row, n_expert, c, sel ? STEER_ADD_SEL : STEER_ADD_LOGIT,
                      layer_act[il], layer_deact[il], sel && grouped);
        }
        ggml_backend_tensor_set(t, scratch.data(), 0, nbytes);
    }

    static bool callback(ggml_tensor * t, bool ask, void * ud) {
        auto * self = static_cast<Observer *>(ud);
        auto [base, il] = split_name(t->name);
        if (ask) {
            return self->wants(base, il);
        }
        if (self->wants(base, il)) {
            self->on_tensor(t, base, il);
        }
        return true;  // false would abort the graph computation
    }

    void attach(uintptr_t ctx) { llama_steer_set_eval_callback(as_ctx(ctx), &Observer::callback, this); }
    void detach(uintptr_t ctx) { llama_steer_set_eval_callback(as_ctx(ctx), nullptr, nullptr); }

    void clear_records() {
        for (auto & v : experts) v.clear();
        for (auto & v : weights) v.clear();
        error.clear();
    }

    // per layer: (experts int32 [n, k], weights float32 [n, k]); layers never seen are absent
    py::dict take() {
        py::dict out;
        for (int il = 0; il < n_layer; ++il) {
            if (experts[il].empty()) continue;
            const py::ssize_t k = k_of[il];
            const py::ssize_t n = (py::ssize_t) experts[il].size() / k;
            py::array_t<int32_t> e({n, k});
            py::array_t<float> w({n, k});
            std::memcpy(e.mutable_data(), experts[il].data(), experts[il].size() * sizeof(int32_t));
            std::memcpy(w.mutable_data(), weights[il].data(), weights[il].size() * sizeof(float));
            out[py::int_(il)] = py::make_tuple(e, w);
        }
        clear_records();
        return out;
    }

    void set_hook(py::array_t<int8_t, py::array::c_style | py::array::forcecast> actions,
                  py::array_t<float, py::array::c_style | py::array::forcecast> bias,
                  float eps, std::string logit_stage_, std::string select_stage_, bool grouped_) {
        if (actions.ndim() != 2 || actions.shape(0) != n_layer || bias.ndim() != 2 ||
            bias.shape(0) != actions.shape(0) || bias.shape(1) != actions.shape(1)) {
            throw py::value_error("hook table must be [n_layer, n_expert] for actions and bias");
        }
        n_expert = (int) actions.shape(1);
        coef.assign((size_t) n_layer * STEER_N_ROWS * n_expert, 0.0f);
        for (int il = 0; il < n_layer; ++il) {
            const int8_t * a = actions.data() + (size_t) il * n_expert;
            const float * b = bias.data() + (size_t) il * n_expert;
            const steer_flags f = steer_coefficients(a, b, n_expert, eps,
                                                     coef.data() + (size_t) il * STEER_N_ROWS * n_expert);
            layer_act[il]     = f.act;
            layer_deact[il]   = f.deact;
            layer_steered[il] = f.any();
        }
        logit_stage = std::move(logit_stage_);
        select_stage = std::move(select_stage_);
        grouped = grouped_;
        hook = true;
    }

    void clear_hook() { hook = false; }
};

void steer_rpc_bind(py::module_ & m);  // steer-rpc.cpp

PYBIND11_MODULE(_native, m) {
    m.doc() = "steer-gguf native bridge (patched libllama)";
    m.attr("API_VERSION") = llama_steer_api_version();
    m.attr("LLAMA_CPP_PYTHON_VERSION") = STEER_LLAMA_CPP_PYTHON_VERSION;
    steer_rpc_bind(m);
    // steer.h's codes, so that Python names them instead of copying the numbers
    py::dict codes;
    codes["OK"] = (int) LLAMA_STEER_OK;
    codes["ERR_NULL"] = (int) LLAMA_STEER_ERR_NULL;
    codes["ERR_SHAPE"] = (int) LLAMA_STEER_ERR_SHAPE;
    codes["ERR_ACTION"] = (int) LLAMA_STEER_ERR_ACTION;
    codes["ERR_NOT_MOE"] = (int) LLAMA_STEER_ERR_NOT_MOE;
    codes["ERR_TOO_MANY"] = (int) LLAMA_STEER_ERR_TOO_MANY;
    codes["ERR_TOO_FEW"] = (int) LLAMA_STEER_ERR_TOO_FEW;
    codes["ERR_NONFINITE"] = (int) LLAMA_STEER_ERR_NONFINITE;
    codes["ERR_ALLOC"] = (int) LLAMA_STEER_ERR_ALLOC;
    codes["ERR_SLOT"] = (int) LLAMA_STEER_ERR_SLOT;
    codes["ERR_SEQ"] = (int) LLAMA_STEER_ERR_SEQ;
    codes["ERR_ROUTE"] = (int) LLAMA_STEER_ERR_ROUTE;
    codes["ERR_TOPK"] = (int) LLAMA_STEER_ERR_TOPK;
    m.attr("STATUS") = codes;
    m.attr("MAX_SLOTS") = (int) LLAMA_STEER_MAX_SLOTS;
    py::dict actions;
    actions["none"] = (int) LLAMA_STEER_NONE;
    actions["activate"] = (int) LLAMA_STEER_ACTIVATE;
    actions["deactivate"] = (int) LLAMA_STEER_DEACTIVATE;
    m.attr("ACTIONS") = actions;

    // actions int8 [n_layer, n_expert], bias float of the same shape or None, topk int32
    // [n_layer] or None; calls set(actions, bias, topk, n_layer, n_expert) without the GIL:
    // (status, message)
    using setter = std::function<int32_t(const int8_t *, const float *, const int32_t *, int32_t, int32_t)>;
    auto with_table = [](py::array_t<int8_t, py::array::c_style | py::array::forcecast> actions, py::object bias,
                         py::object topk, const setter & set) -> py::tuple {
        if (actions.ndim() != 2) {
            return py::make_tuple((int) LLAMA_STEER_ERR_SHAPE, std::string("actions must be 2-D [n_layer, n_expert]"));
        }
        py::array_t<float, py::array::c_style | py::array::forcecast> b;
        const float * bp = nullptr;
        if (!bias.is_none()) {
            b = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(bias);
            if (!b || b.ndim() != 2 || b.shape(0) != actions.shape(0) || b.shape(1) != actions.shape(1)) {
                return py::make_tuple((int) LLAMA_STEER_ERR_SHAPE, std::string("bias must have the shape of actions"));
            }
            bp = b.data();
        }
        py::array_t<int32_t, py::array::c_style | py::array::forcecast> k;
        const int32_t * kp = nullptr;
        if (!topk.is_none()) {
            k = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(topk);
            if (!k || k.ndim() != 1 || k.shape(0) != actions.shape(0)) {
                return py::make_tuple((int) LLAMA_STEER_ERR_SHAPE, std::string("topk must be 1-D [n_layer]"));
            }
            kp = k.data();
        }
        int32_t rc;
        {
            py::gil_scoped_release release;
            rc = set(actions.data(), bp, kp, (int32_t) actions.shape(0), (int32_t) actions.shape(1));
        }
        return status(rc);
    };

    m.def("set_table", [with_table](uintptr_t ctx, py::array_t<int8_t, py::array::c_style | py::array::forcecast> actions,
                                    py::object bias, float eps, py::object topk) {
        return with_table(actions, bias, topk, [&](const int8_t * a, const float * b, const int32_t * k, int32_t nl, int32_t ne) {
            return llama_steer_table_set(as_ctx(ctx), -1, a, b, k, nl, ne, eps);
        });
    }, py::arg("ctx"), py::arg("actions"), py::arg("bias"), py::arg("eps"), py::arg("topk") = py::none());

    m.def("clear_table", [](uintptr_t ctx) { llama_steer_clear(as_ctx(ctx)); });

    m.def("slot_set", [with_table](uintptr_t ctx, int32_t slot,
                                   py::array_t<int8_t, py::array::c_style | py::array::forcecast> actions,
                                   py::object bias, float eps, py::object topk) {
        if (slot == -1) {  // -1 is the context-wide table in llama_steer_table_set, never a slot
            return status(llama_steer_slot_set(as_ctx(ctx), slot, nullptr, nullptr, 0, 0, eps));
        }
        return with_table(actions, bias, topk, [&](const int8_t * a, const float * b, const int32_t * k, int32_t nl, int32_t ne) {
            return llama_steer_table_set(as_ctx(ctx), slot, a, b, k, nl, ne, eps);
        });
    }, py::arg("ctx"), py::arg("slot"), py::arg("actions"), py::arg("bias"), py::arg("eps"), py::arg("topk") = py::none());

    m.def("slot_clear", [](uintptr_t ctx, int32_t slot) { return status(llama_steer_slot_clear(as_ctx(ctx), slot)); },
          py::arg("ctx"), py::arg("slot"));

    m.def("seq_bind", [](uintptr_t ctx, int32_t seq, int32_t slot) {
        return status(llama_steer_seq_bind(as_ctx(ctx), seq, slot));
    }, py::arg("ctx"), py::arg("seq"), py::arg("slot"));

    // routing recorded by the graph (steer.h, API version 3)
    py::dict route_flags;
    route_flags["experts"] = (int) LLAMA_STEER_ROUTE_EXPERTS;
    route_flags["weights"] = (int) LLAMA_STEER_ROUTE_WEIGHTS;
    route_flags["norms"] = (int) LLAMA_STEER_ROUTE_NORMS;
    m.attr("ROUTE") = route_flags;

    m.def("route_record", [](uintptr_t ctx, int32_t flags) {
        return status(llama_steer_route_record(as_ctx(ctx), flags));
    }, py::arg("ctx"), py::arg("flags"));

    // every row recorded since the last clear, then clear: {layer: (experts int32 [n, k],
    // weights float32 [n, k] or None, batch_idx int32 [n])} for the layers that recorded rows;
    // raises ValueError with steer.h's message when the recorder failed
    // {layer: (experts, weights or None, batch_idx)}, with norms=True a fourth: the expert output norms
    m.def("route_take", [](uintptr_t ctx, int32_t n_layer, bool weights, bool norms) {
        llama_context * c = as_ctx(ctx);
        py::dict out;
        for (int32_t il = 0; il < n_layer; ++il) {
            int32_t k = 0, n;
            {
                py::gil_scoped_release release;  // the first call waits for the device
                n = llama_steer_route_rows(c, il, &k);
            }
            if (n < 0) {
                throw py::value_error(llama_steer_last_error());
            }
            if (n == 0) {
                continue;
            }
            py::array_t<int32_t> e({(py::ssize_t) n, (py::ssize_t) k});
            py::array_t<int32_t> b((py::ssize_t) n);
            py::object w = py::none();
            float * wp = nullptr;
            if (weights) {
                py::array_t<float> wa({(py::ssize_t) n, (py::ssize_t) k});
                wp = wa.mutable_data();
                w = wa;
            }
            const int32_t rc = llama_steer_route_read(c, il, e.mutable_data(), wp, b.mutable_data(), n);
            if (rc != LLAMA_STEER_OK) {
                throw py::value_error(llama_steer_last_error());
            }
            if (!norms) {
                out[py::int_(il)] = py::make_tuple(e, w, b);
                continue;
            }
            py::array_t<float> na({(py::ssize_t) n, (py::ssize_t) k});
            if (llama_steer_route_read_norms(c, il, na.mutable_data(), n) != LLAMA_STEER_OK) {
                throw py::value_error(llama_steer_last_error());
            }
            out[py::int_(il)] = py::make_tuple(e, w, b, na);
        }
        llama_steer_route_clear(c);
        return out;
    }, py::arg("ctx"), py::arg("n_layer"), py::arg("weights"), py::arg("norms") = false);

    // tokens to route without logits: a bool/int8 mask over the next decodes' batch, or None
    m.def("route_tokens", [](uintptr_t ctx, py::object want) -> py::tuple {
        if (want.is_none()) {
            return status(llama_steer_route_tokens(as_ctx(ctx), nullptr, 0));
        }
        auto w = py::array_t<int8_t, py::array::c_style | py::array::forcecast>::ensure(want);
        if (!w || w.ndim() != 1) {
            return py::make_tuple((int) LLAMA_STEER_ERR_ROUTE, std::string("route tokens: a 1-D mask over the batch"));
        }
        return status(llama_steer_route_tokens(as_ctx(ctx), w.data(), (int32_t) w.shape(0)));
    }, py::arg("ctx"), py::arg("want"));

    m.def("route_clear", [](uintptr_t ctx) {
        py::gil_scoped_release release;
        llama_steer_route_clear(as_ctx(ctx));
    }, py::arg("ctx"));

    py::class_<Observer>(m, "Observer")
        .def(py::init<int>())
        .def_readwrite("record", &Observer::record)
        .def_readwrite("record_weights", &Observer::record_weights)
        .def_readonly("error", &Observer::error)
        .def("attach", &Observer::attach)
        .def("detach", &Observer::detach)
        .def("take", &Observer::take)
        .def("clear_records", &Observer::clear_records)
        .def("set_hook", &Observer::set_hook)
        .def("clear_hook", &Observer::clear_hook);
}

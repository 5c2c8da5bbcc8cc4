"""How much each expert is used on a text: routing frequency and REAP's saliency (the mean, over
the tokens routed to an expert, of its gate weight times the L2 norm of its output), recorded by
the graph (steer.h API 5, LLAMA_STEER_ROUTE_NORMS) on the model's own (unsteered) routing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import SteerError
from ..model import ROUTES_TWICE
from .contexts import _native, check_status, llama_cpp
from .tracing import OUTPUT_ROWS_ONLY


@dataclass
class ExpertUsage:
    layers: list[int]          # MoE layers, rows of the tables below
    tokens: int                # calibration tokens seen
    count: np.ndarray          # int64 [layers, n_expert]: tokens routed to the expert
    weight: np.ndarray         # float64 [layers, n_expert]: sum of its gate weights
    saliency: np.ndarray       # float64 [layers, n_expert]: sum of gate weight x output norm
    layer_tokens: np.ndarray   # int64 [layers]: tokens routed in that layer (all but a sampled last layer)
    last_stride: int = 1       # the model's last layer routed 1 token in this many (1: all)

    def frequency(self) -> np.ndarray:
        return self.count / np.maximum(1, self.layer_tokens)[:, None]

    def reap(self) -> np.ndarray:
        """REAP's score: mean weight x norm over the tokens routed to the expert (0 if none)."""
        return np.divide(self.saliency, self.count, out=np.zeros_like(self.saliency), where=self.count > 0)


def last_layer_rows(n: int, stride: int) -> np.ndarray:
    """Which of a window's n tokens the model's last layer routes when it samples 1 in `stride`:
    evenly spaced, always the window's last token (the output row prefill computes anyway)."""
    rows = np.zeros(n, np.int8)
    rows[stride - 1::stride] = 1
    rows[n - 1] = 1
    return rows


def expert_usage(llm, windows: Sequence[Sequence[int]], on_progress: Callable[[int], None] | None = None,
                 last_stride: int = 1) -> ExpertUsage:
    """Prefill each window alone (unsteered) with the routing recorder keeping experts, weights
    and output norms of every token in every MoE layer; with last_stride > 1 the model's last
    layer routes 1 token in last_stride (last_layer_rows).

    Why sample the last layer: llama.cpp computes it for the output row only, so recording its
    experts' output norms for every token adds a whole layer's expert work to prefill (1 / MoE
    layers of it: 12% on an 8-layer model, 2% on a 48-layer one). REAP's score is a mean over the
    tokens routed to an expert, which an evenly spaced sample estimates without bias."""
    info = llm.info
    layers = list(info.moe_layers)
    count = np.zeros((len(layers), info.n_expert), np.int64)
    weight = np.zeros((len(layers), info.n_expert), np.float64)
    sal = np.zeros((len(layers), info.n_expert), np.float64)
    layer_tokens = np.zeros(len(layers), np.int64)
    seen, n = 0, info.n_expert
    for win, rec in window_records(llm, windows, last_stride):
        for j, il in enumerate(layers):
            e, w, _, nrm = rec[il]
            ok = e >= 0
            ex = e[ok]
            layer_tokens[j] += e.shape[0]
            count[j] += np.bincount(ex, minlength=n)[:n]
            weight[j] += np.bincount(ex, weights=w[ok].astype(np.float64), minlength=n)[:n]
            sal[j] += np.bincount(ex, weights=(w[ok].astype(np.float64) * nrm[ok]), minlength=n)[:n]
        seen += len(win)
        if on_progress:
            on_progress(1)
    return ExpertUsage(layers, seen, count, weight, sal, layer_tokens, last_stride)


def window_records(llm, windows: Sequence[Sequence[int]], last_stride: int = 1):
    """Yield (window, records) per window: records[il] = (experts, weights, batch_idx, norms) of
    MoE layer il, a row per token it routed (the last layer's: last_layer_rows)."""
    info = llm.info
    if llm.recorder != "graph":
        raise SteerError("saliency needs the graph recorder (recorder='graph')")
    if info.architecture in ROUTES_TWICE:
        raise SteerError(f"{info.architecture} routes twice per layer: its expert saliency is not recorded")
    if last_stride < 1:
        raise SteerError(f"the last layer's sampling stride must be >= 1, got {last_stride}")
    n_tok = max(len(w) for w in windows)
    last = info.n_layer - 1
    flags = _native.ROUTE["experts"] | _native.ROUTE["weights"] | _native.ROUTE["norms"]
    with llm.lock, llm.steering(None):
        tc = llm._trace_context(n_tok)
        tc.rec.off()  # this function sets the flags itself; the trace context's recorder restarts on its next run
        outputs_all = info.architecture in OUTPUT_ROWS_ONLY
        check_status(*_native.route_record(tc.ptr, flags), "saliency recorder")
        try:
            for win in windows:
                b = tc.batch
                routed = last_layer_rows(len(win), last_stride)
                for i, t in enumerate(win):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = int(t), i, 1, 0
                    b.logits[i] = bool(routed[i]) if outputs_all else i == len(win) - 1
                b.n_tokens = len(win)
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(tc.ctx.ctx), True)
                mask = None if outputs_all else routed
                check_status(*_native.route_tokens(tc.ptr, mask), "saliency recorder")
                _native.route_clear(tc.ptr)
                llm.govern(tc.ctx.ctx)
                if llama_cpp.llama_decode(tc.ctx.ctx, b) != 0:
                    raise SteerError("llama_decode failed while recording expert saliency")
                try:
                    rec = _native.route_take(tc.ptr, info.n_layer, True, True)
                except ValueError as e:
                    raise SteerError(str(e)) from None
                for il in info.moe_layers:
                    want = int(routed.sum()) if il == last else len(win)
                    if il not in rec or rec[il][0].shape[0] != want:
                        raise SteerError(f"saliency recorder: MoE layer {il} did not route every token")
                yield win, rec
        finally:
            _native.route_record(tc.ptr, 0)
            _native.route_tokens(tc.ptr, None)

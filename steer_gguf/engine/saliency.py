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
    tokens: int                # calibration tokens seen (every one routed in every MoE layer)
    count: np.ndarray          # int64 [layers, n_expert]: tokens routed to the expert
    weight: np.ndarray         # float64 [layers, n_expert]: sum of its gate weights
    saliency: np.ndarray       # float64 [layers, n_expert]: sum of gate weight x output norm

    def frequency(self) -> np.ndarray:
        return self.count / max(1, self.tokens)

    def reap(self) -> np.ndarray:
        """REAP's score: mean weight x norm over the tokens routed to the expert (0 if none)."""
        return np.divide(self.saliency, self.count, out=np.zeros_like(self.saliency), where=self.count > 0)


def expert_usage(llm, windows: Sequence[Sequence[int]], on_progress: Callable[[int], None] | None = None) -> ExpertUsage:
    """Prefill each window alone (unsteered) with the routing recorder keeping experts, weights
    and output norms of every token in every MoE layer."""
    info = llm.info
    if llm.recorder != "graph":
        raise SteerError("saliency needs the graph recorder (recorder='graph')")
    if info.architecture in ROUTES_TWICE:
        raise SteerError(f"{info.architecture} routes twice per layer: its expert saliency is not recorded")
    n_tok = max(len(w) for w in windows)
    layers = list(info.moe_layers)
    row = {il: j for j, il in enumerate(layers)}
    count = np.zeros((len(layers), info.n_expert), np.int64)
    weight = np.zeros((len(layers), info.n_expert), np.float64)
    sal = np.zeros((len(layers), info.n_expert), np.float64)
    seen = 0
    flags = _native.ROUTE["experts"] | _native.ROUTE["weights"] | _native.ROUTE["norms"]
    with llm.lock, llm.steering(None):
        tc = llm._trace_context(n_tok)
        tc.rec.off()  # this function sets the flags itself; the trace context's recorder restarts on its next run
        outputs_all = info.architecture in OUTPUT_ROWS_ONLY
        check_status(*_native.route_record(tc.ptr, flags), "saliency recorder")
        try:
            for win in windows:
                b = tc.batch
                for i, t in enumerate(win):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = int(t), i, 1, 0
                    b.logits[i] = outputs_all or i == len(win) - 1
                b.n_tokens = len(win)
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(tc.ctx.ctx), True)
                mask = None if outputs_all else np.ones(len(win), np.int8)
                check_status(*_native.route_tokens(tc.ptr, mask), "saliency recorder")
                _native.route_clear(tc.ptr)
                llm.govern(tc.ctx.ctx)
                if llama_cpp.llama_decode(tc.ctx.ctx, b) != 0:
                    raise SteerError("llama_decode failed while recording expert saliency")
                try:
                    rec = _native.route_take(tc.ptr, info.n_layer, True, True)
                except ValueError as e:
                    raise SteerError(str(e)) from None
                for il in layers:
                    if il not in rec or rec[il][0].shape[0] != len(win):
                        raise SteerError(f"saliency recorder: MoE layer {il} did not route every token")
                    e, w, _, nrm = rec[il]
                    ok = e >= 0
                    j, ex, n = row[il], e[ok], info.n_expert
                    count[j] += np.bincount(ex, minlength=n)[:n]
                    weight[j] += np.bincount(ex, weights=w[ok].astype(np.float64), minlength=n)[:n]
                    sal[j] += np.bincount(ex, weights=(w[ok].astype(np.float64) * nrm[ok]), minlength=n)[:n]
                seen += len(win)
                if on_progress:
                    on_progress(1)
        finally:
            _native.route_record(tc.ptr, 0)
            _native.route_tokens(tc.ptr, None)
    return ExpertUsage(layers, seen, count, weight, sal)

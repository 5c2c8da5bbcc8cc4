"""Per-sequence steering on one llama.cpp context: profiles held in the context's slots,
sequences bound to them (steer.h, API version 2).

Putting a profile in a slot rebuilds the context's graph; binding a sequence does not. So a
profile keeps its slot after its last sequence leaves, and is evicted only when a new
profile needs the room.

On a model whose gating adds a selection bias (DeepSeek-V3 style), a slot table moves the
steering after the bias add, off the GPUs' fused gating kernels. So there, a batch whose
sequences all take one profile runs it as the context-wide table with every slot emptied:
API 1's graph, which keeps the fused kernels. Leaving that mode refills the slots; either
switch costs one graph rebuild."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SteerError
from ..model import ModelInfo
from ..profile import Profile

PHASES = ("all", "generation", "prompt")


def _native():
    # loaded on first use: importing the package must not load libllama (runtime.py)
    from .contexts import _native

    return _native


def _check(rc: int, msg: str, what: str) -> None:
    from .contexts import check_status

    check_status(rc, msg, what)


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise SteerError(f"steer_phase must be one of {', '.join(PHASES)}, got {phase!r}")
    return phase


def steered_in(phase: str, prompt: bool) -> bool:
    """Whether a sequence under `phase` is steered while its prompt (prompt=True) or its
    generated tokens are decoded. The binding switches between the prompt's decode and the
    first generated token's, so under "generation" the first token is sampled from an
    unsteered reading of the prompt."""
    return phase == "all" or (phase == "prompt") == prompt


@dataclass
class _Held:
    profile: Profile
    users: int = 0
    last_used: int = 0
    loaded: bool = True  # False while emptied for the context-wide table


class ContextSlots:
    """The slots of one context (graph engine only). acquire() a slot for a profile, bind()
    sequences to it, release() it when a sequence is done."""

    def __init__(self, ptr: int, info: ModelInfo, force: bool = False, n_slots: int | None = None,
                 shared_wide: bool | None = None):
        self.ptr, self.info, self.force = ptr, info, force
        self.n_slots = min(n_slots or _native().MAX_SLOTS, _native().MAX_SLOTS)
        self.held: dict[int, _Held] = {}  # slot -> profile
        self.bound: dict[int, int | None] = {}  # seq -> slot
        self._clock = 0
        # run a batch that shares one profile as the context-wide table (module docstring)
        self.shared_wide = info.has_selection_bias if shared_wide is None else shared_wide
        self.wide: int | None = None  # the slot whose profile is the context-wide table now

    def acquire(self, profile: Profile | None) -> int | None:
        """The slot holding `profile` (put there if need be), or None for no steering."""
        if profile is None or profile.is_empty:
            return None
        self._clock += 1
        for slot, h in self.held.items():
            if h.profile is profile:
                h.users += 1
                h.last_used = self._clock
                return slot
        profile.check(self.info, force=self.force)
        slot = self._free_slot()
        self._load(slot, profile)  # llama.cpp validates it here, before any sequence takes it
        self.held[slot] = _Held(profile, 1, self._clock)
        return slot

    def _load(self, slot: int, profile: Profile) -> None:
        actions, bias = profile.to_arrays(self.info, _native().ACTIONS)
        rc, msg = _native().slot_set(self.ptr, slot, actions, bias, float(profile.eps), profile.topk_array(self.info))
        _check(rc, msg, f"profile {profile.name!r}")

    def _free_slot(self) -> int:
        unused = [s for s in range(self.n_slots) if s not in self.held]
        if unused:
            return unused[0]
        idle = [s for s, h in self.held.items() if h.users == 0]
        if not idle:
            raise SteerError(f"all {self.n_slots} steering slots are in use by running sequences")
        slot = min(idle, key=lambda s: self.held[s].last_used)
        del self.held[slot]  # slot_set below replaces its table
        if self.wide == slot:  # its profile leaves the context-wide table too
            _native().clear_table(self.ptr)
            self.wide = None
        return slot

    def release(self, slot: int | None) -> None:
        if slot is not None and slot in self.held:
            self.held[slot].users = max(0, self.held[slot].users - 1)

    def route(self, wanted: dict[int, int | None]) -> None:
        """Put each sequence's slot (None: unsteered) in force for the next decode: by binding,
        or, where shared_wide allows and every sequence takes the same slot, as the
        context-wide table."""
        shared = set(wanted.values())
        if self.shared_wide and len(shared) == 1 and None not in shared:
            self._go_wide(shared.pop())
            return
        if self.wide is not None:
            _native().clear_table(self.ptr)
            self.wide = None
        for seq, slot in wanted.items():
            if slot is not None and not self.held[slot].loaded:
                self._load(slot, self.held[slot].profile)
                self.held[slot].loaded = True
            self.bind(seq, slot)

    def _go_wide(self, slot: int) -> None:
        # with every slot empty llama.cpp steers all tokens by the context-wide table, whatever
        # their bindings; route() rebinds each sequence when the slots come back
        if self.wide == slot:
            return
        p = self.held[slot].profile
        actions, bias = p.to_arrays(self.info, _native().ACTIONS)
        rc, msg = _native().set_table(self.ptr, actions, bias, float(p.eps), p.topk_array(self.info))
        _check(rc, msg, f"profile {p.name!r}")
        for s, h in self.held.items():
            if h.loaded:
                _native().slot_clear(self.ptr, s)
                h.loaded = False
        self.wide = slot

    def bind(self, seq: int, slot: int | None) -> None:
        if self.bound.get(seq) == slot:
            return
        rc, msg = _native().seq_bind(self.ptr, seq, -1 if slot is None else slot)
        _check(rc, msg, f"sequence {seq}")
        self.bound[seq] = slot

    def clear(self) -> None:
        """Empty every slot and unbind every sequence (upstream routing)."""
        for seq in [s for s, b in self.bound.items() if b is not None]:
            self.bind(seq, None)
        for slot in list(self.held):
            _native().slot_clear(self.ptr, slot)
        self.held.clear()
        if self.wide is not None:
            _native().clear_table(self.ptr)
            self.wide = None

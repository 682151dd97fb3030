"""Live tensor memory, counted from storage creation and death: the tracker ``diffrl plan`` runs over a whole
training step (under fake tensors at full size, or on real tensors to check itself).

Every op's outputs pass through a dispatch mode; a storage not seen before is added to the live total and a
weakref finaliser subtracts it when it dies. Views share their base's storage and are counted once. The
peak of each phase is recorded with the storages live at that moment, so it can be split afterwards into
weights, gradients, optimizer state and the rest (activations and temporaries) by what those storages turned
out to be. Storages that exist before tracking starts are added by :meth:`LiveMemory.adopt`."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "other")


def _storage(t):
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _address(storage) -> int:
    return storage._cdata  # the C++ StorageImpl: one per storage, shared by every view


@dataclasses.dataclass
class PhasePeak:
    """The most memory live during one phase, and which storages (by key) made it up. ``other``: whatever is
    not a weight, a gradient, optimizer state or saved for backward (rollout buffers, logits, copies)."""
    bytes: int = 0
    live: dict[int, int] = dataclasses.field(default_factory=dict)  # storage key -> bytes, at the peak
    activations: set[int] = dataclasses.field(default_factory=set)  # of those, saved for backward

    def split(self, weights: set[int], gradients: set[int], optimizer: set[int]) -> dict[str, int]:
        """The peak's bytes per category, given which storage keys are weights, gradients, optimizer state."""
        out = dict.fromkeys(CATEGORIES, 0)
        for key, size in self.live.items():
            category = ("weights" if key in weights else "gradients" if key in gradients
                        else "optimizer" if key in optimizer else "activations" if key in self.activations
                        else "other")
            out[category] += size
        return out


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storages on ``device_type`` (all devices when None), with per-phase peaks.

    with LiveMemory() as mem:
        with mem.phase("rollout"): ...
        with mem.phase("update"): ...
    mem.peaks["update"].bytes
    """

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}
        self.total = 0
        self.peaks: dict[str, PhasePeak] = {}
        self._phase: str | None = None
        # Keys are numbers never reused: a storage's address is, once it dies, and a later gradient at the
        # address of an earlier temporary must not be taken for it.
        self._ids: dict[int, int] = {}
        self._next_id = itertools.count()
        self.saved_for_backward: set[int] = set()   # storage keys autograd saved (activations)
        self.gradient_keys: set[int] = set()        # storage keys that held a parameter's .grad
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        key = self.key(t)
        if key is not None:
            self.saved_for_backward.add(key)
        return t

    def __enter__(self):
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._saved_hooks.__exit__(*exc)

    # ---- counting -------------------------------------------------------------------------------------
    def _add(self, t) -> None:
        storage = _storage(t)
        if storage is None or (self.device_type and t.device.type != self.device_type):
            return
        address = _address(storage)
        if address in self._ids:
            return
        key = self._ids[address] = next(self._next_id)
        size = storage.nbytes()
        self.live[key] = size
        self.total += size
        weakref.finalize(storage, self._remove, address, key)
        self._note_peak()

    def key(self, t) -> int | None:
        """The tracker's key of a live tensor's storage (None for one it has not seen)."""
        storage = _storage(t)
        return None if storage is None else self._ids.get(_address(storage))

    def keys(self, tensors) -> set[int]:
        return {k for k in map(self.key, tensors) if k is not None}

    def _remove(self, address: int, key: int) -> None:
        self._ids.pop(address, None)
        self.total -= self.live.pop(key, 0)
        self.saved_for_backward.discard(key)

    def _note_peak(self) -> None:
        if self._phase is None:
            return
        peak = self.peaks[self._phase]
        if self.total > peak.bytes:
            peak.bytes = self.total
            peak.live = dict(self.live)
            peak.activations = self.saved_for_backward & peak.live.keys()

    def adopt(self, tensors) -> None:
        """Count tensors that existed before tracking began (a model built earlier)."""
        for t in tensors:
            self._add(t)

    def watch_gradients(self, params) -> None:
        """Remember the storage of each ``.grad`` of ``params`` as it is accumulated."""
        def note(p):
            key = self.key(p.grad)
            if key is not None:
                self.gradient_keys.add(key)
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(note)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out

    # ---- phases ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Record this block's peak under ``name`` (phases do not nest; a repeated name keeps the higher)."""
        previous, self._phase = self._phase, name
        self.peaks.setdefault(name, PhasePeak())
        self._note_peak()
        try:
            yield
        finally:
            self._phase = previous

"""Values under fake tensors: what code reads from a tensor (``.item()``, ``bool(t)``, a boolean index, the
size ``unique`` or ``nonzero`` returns) has no answer in a fake tensor, and a training step asks it
constantly (noise schedules, group ids, finiteness checks).

:class:`ShadowValues` keeps a real copy beside every small fake tensor (up to ``SMALL`` elements: schedules,
timesteps, rewards, group ids, per-sample flags), computed by running each op again on the real copies, so
those values are exact (``.numpy()``, which is not an op, is answered from the real copy too: diffusers'
schedulers read their tables back that way). Large tensors (latents, activations, logits, weights) stay fake;
what code asks of them gets a fixed answer that describes a healthy run taking its longest path: every value
is finite (``isnan`` / ``isinf`` masks are all False, ``isfinite`` all True), a comparison holds nowhere (no
row stops early), ``~``, ``&``, ``|``, ``any``, ``all`` carry these through; any other flag is True, an
integer 1, a float 0.5, and a mask of unknown elements selects every element (the largest, so the most memory,
a boolean index can take)."""

from __future__ import annotations

import math
import weakref

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
SMALL = 1 << 16    # elements: a tensor this size or smaller gets a real copy

_ALL_FALSE = {aten.isinf.default, aten.isnan.default, aten.isposinf.default, aten.isneginf.default}
# A comparison of large unknown values holds nowhere: no row is "done", "stable" or "finished", so every loop
# runs its whole length (the most work and memory a step can take) -- except what finite values always
# satisfy, which is how torch's own isfinite / isnan / isinf decompose: x == x, x != inf, x < inf, x > -inf.
_COMPARISONS = {aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
                aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
                aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge"}
_ALL_TRUE = {aten.isfinite.default}
_NOT = {aten.logical_not.default, aten.bitwise_not.default}
_AND = {aten.logical_and.default, aten.bitwise_and.Tensor, aten.mul.Tensor}
_OR = {aten.logical_or.default, aten.bitwise_or.Tensor}
_CARRY = {aten.any.default, aten.any.dim, aten.any.dims, aten.all.default, aten.all.dim, aten.all.dims,
          aten.clone.default, aten.view.default, aten._to_copy.default, aten.expand.default,
          aten.select.int, aten.slice.Tensor, aten.squeeze.dim, aten.unsqueeze.default, aten.reshape.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default}


def _guess(dtype: torch.dtype):
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return 0.5
    return 1


class ShadowValues(TorchDispatchMode):
    """Enter it inside ``fake_mode`` (after it, and after any counting mode), so it sees each op first."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self._real: dict[int, torch.Tensor] = {}   # id(fake tensor) -> its real copy
        self._flag: dict[int, bool] = {}           # id(large bool tensor) -> the value of every element

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _keep(self, table: dict, fake, value) -> None:
        key = id(fake)
        if key not in table:
            weakref.finalize(fake, table.pop, key, None)
        table[key] = value

    def _all_shadowed(self, tensors) -> bool:
        """Every tensor is real (``torch.tensor([...])`` on its way in) or a fake one with a real copy."""
        return all(id(t) in self._real or not isinstance(t, FakeTensor) for t in tensors)

    def _real_of(self, x):
        return self._real.get(id(x), x) if isinstance(x, torch.Tensor) else x

    def _run_real(self, func, args, kwargs):
        """``func`` on the real copies (None when it fails: a real op that needs a large, fake input)."""
        real = self._real_of
        try:
            with _disable_current_modes():
                return func(*tree_map(real, args), **tree_map(real, kwargs))
        except Exception:  # noqa: BLE001  (the fake result stands without a copy)
            return None

    # ---- .numpy(): not an op, so dispatch never sees it -------------------------------------------------
    def __enter__(self):
        original = self._tensor_numpy = torch.Tensor.numpy
        shadows = self

        def numpy(tensor, *args, **kwargs):
            # A schedule computed on the host (diffusers' schedulers read their tables back with .numpy()).
            if isinstance(tensor, FakeTensor) and id(tensor) in shadows._real:
                real = shadows._real[id(tensor)]
                with _disable_current_modes():
                    return original(real, *args, **kwargs)
            return original(tensor, *args, **kwargs)

        torch.Tensor.numpy = numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.numpy = self._tensor_numpy
        return super().__exit__(*exc)

    def _as_fake(self, real):
        with _disable_current_modes():
            return tree_map(lambda r: self.fake_mode.from_tensor(r) if isinstance(r, torch.Tensor) else r, real)

    # ---- large tensors: fixed answers -------------------------------------------------------------------
    def _flag_of(self, t):
        """True / False when every element of bool ``t`` is known to be so (a fixed answer, or a real copy
        that is all one value), else None."""
        if not isinstance(t, torch.Tensor):
            return None
        real = self._real.get(id(t))
        if real is not None and real.dtype == torch.bool:
            with _disable_current_modes():
                return True if bool(real.all()) else False if not bool(real.any()) else None
        return self._flag.get(id(t))

    def _nonzero(self, mask):
        if self._flag_of(mask) is False:
            return torch.zeros(0, mask.dim(), dtype=torch.long, device=mask.device)
        grid = torch.meshgrid(*(torch.arange(n, device=mask.device) for n in mask.shape), indexing="ij")
        return torch.stack([g.reshape(-1) for g in grid], dim=1)

    def _long_indices(self, indices):
        """Boolean indices as long ones: a mask with a real copy (a padding mask) at its exact positions, any
        other mask at every position."""
        out = []
        for index in indices:
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                real = self._real.get(id(index))
                if real is not None:
                    with _disable_current_modes():
                        real = real.nonzero()
                out.extend((self._nonzero(index) if real is None else self._as_fake(real)).unbind(1))
            else:
                out.append(index)
        return out

    @staticmethod
    def _compare(op: str, left, right) -> bool:
        """A comparison of unknown finite values: what every finite value satisfies, else nowhere."""
        if left is right:
            return op in ("eq", "le", "ge")
        bound = right
        if isinstance(right, torch.Tensor) and right.numel() == 1 and not isinstance(right, FakeTensor):
            with _disable_current_modes():
                bound = right.item()
        if isinstance(bound, float) and math.isinf(bound):
            return op == "ne" or (op in ("lt", "le") and bound > 0) or (op in ("gt", "ge") and bound < 0)
        return False

    def _note_flag(self, func, args, out) -> None:
        value = None
        if func in _COMPARISONS:
            value = self._compare(_COMPARISONS[func], args[0], args[1])
        elif func in _ALL_FALSE:
            value = False
        elif func in _ALL_TRUE:
            value = True
        elif func in _NOT:
            value = None if self._flag_of(args[0]) is None else not self._flag_of(args[0])
        elif func in _AND or func in _OR:
            a, b = self._flag_of(args[0]), self._flag_of(args[1]) if len(args) > 1 else None
            if func in _AND and (a is False or b is False):
                value = False
            elif func in _OR and (a is True or b is True):
                value = True
            elif a is not None and b is not None:
                value = (a and b) if func in _AND else (a or b)
        elif func in _CARRY:
            value = self._flag_of(args[0])
        if value is not None:
            self._keep(self._flag, out, value)

    # ---- dispatch -------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        shadowed = self._all_shadowed(tensors)
        if func in _READS:
            if shadowed:
                return self._run_real(func, args, kwargs)
            flag = self._flag_of(args[0])
            if flag is not None:
                return flag
            try:
                return func(*args, **kwargs)   # a constant the fake tensor still knows
            except DataDependentOutputException:
                return _guess(args[0].dtype)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            real = self._run_real(func, args, kwargs) if shadowed else None
            if real is not None:   # unique, nonzero, bincount, masked_select on small real copies: exact
                out = self._as_fake(real)
                for fake, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                    if isinstance(fake, torch.Tensor):
                        self._keep(self._real, fake, r)
                return out
            if func is aten.nonzero.default:
                return self._nonzero(args[0])
            if func in _INDEXING:
                return func(args[0], self._long_indices(args[1]), *args[2:], **kwargs)
            raise
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if shadowed and outputs and all(t.numel() <= SMALL for t in outputs):
            real = self._run_real(func, args, kwargs)
            if real is not None:
                for fake, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
                    if isinstance(fake, torch.Tensor) and isinstance(r, torch.Tensor):
                        self._keep(self._real, fake, r)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool and id(out) not in self._real:
            self._note_flag(func, args, out)
        return out

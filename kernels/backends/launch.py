"""Repeat a Triton launch with new pointers, without Triton's per-call argument binding.

Why: `kernel[grid](...)` binds and specializes every argument, builds a cache key from them, checks globals and
looks up the device and stream on each call: ~50-100 us of host time on the device's CPU, more than the GPU time of
the small inference kernels (a LayerNorm over 256 x 197 tokens, agent attention at 224 px) and the reason those
models' steps were host-bound. A caller whose arguments keep their specialization from call to call (the same
dtypes, ints and float values; only the pointers change) keeps the compiled kernel of a first, ordinary launch and
calls its launcher directly.

`prepare` makes that first launch and returns a `Launch`; `Launch(*pointers)` repeats it with the pointer arguments
replaced. Pointers that lose the 16-byte alignment Triton specialized on, another current device, launch hooks
(profilers) or Triton's interpreter take the ordinary path, so a `Launch` is always correct, only not always fast.
"""
from __future__ import annotations

from typing import Sequence

import torch
from triton import knobs

__all__ = ["Launch", "prepare"]


def _address(p) -> int:
    return p if type(p) is int else p.data_ptr()


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set (a profiler's): a callable, or a non-empty `HookChain` (Triton >= 3.5
    keeps an empty chain there)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _Pointer:
    """A device address with a dtype, which Triton's ordinary launch specializes as a pointer (an int would be an
    integer argument)."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


class Launch:
    """A prepared launch of `kernel[grid](*args, **meta)`; `__call__` replaces the arguments at `slots`.

    Built by `prepare`. The caller keys its cache of `Launch`es on everything that fixes the other arguments (shapes,
    strides, dtypes, flags), so only pointers (tensors or device addresses as ints) vary between calls."""

    __slots__ = ("kernel", "grid", "args", "meta", "slots", "aligned", "dtypes", "device", "_run",
                 "_function", "_packed", "_params")

    def __init__(self, kernel, grid, args, meta, slots, compiled):
        self.kernel, self.args, self.meta, self.slots = kernel, list(args), dict(meta), tuple(slots)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))  # the launcher takes three; Triton's launch pads the same
        # Triton's specialization: a pointer that was 16-byte aligned at compile time is assumed aligned
        self.aligned = tuple(_address(self.args[i]) % 16 == 0 for i in self.slots)
        self.dtypes = tuple(self.args[i].dtype for i in self.slots)
        self._run = self._function = self._packed = self._params = None
        self.device = -1
        if compiled is not None and hasattr(compiled, "packed_metadata"):  # None under Triton's interpreter
            bound = kernel.signature.bind(*args, **{k: v for k, v in meta.items() if k in kernel.arg_names})
            bound.apply_defaults()
            self._params = list(bound.arguments.values())  # every parameter in order, constexprs included
            self._run, self._function, self._packed = compiled.run, compiled.function, compiled.packed_metadata
            self.device = torch.cuda.current_device()
        for i in self.slots:  # hold no first-call buffers
            self.args[i] = None
            if self._params is not None:
                self._params[i] = None

    @property
    def direct(self) -> bool:
        """Whether repeats can call the launcher directly (False under Triton's interpreter, whose ordinary launch
        needs tensors, not addresses)."""
        return self._run is not None

    def __call__(self, *pointers) -> None:
        if len(pointers) != len(self.slots):
            raise ValueError(f"expected {len(self.slots)} pointer arguments, got {len(pointers)}")
        if self._run is not None and self._fast(pointers):
            params = self._params.copy()
            for i, p in zip(self.slots, pointers):
                params[i] = p
            self._run(*self.grid, torch._C._cuda_getCurrentRawStream(self.device), self._function, self._packed,
                      None, None, None, *params)
            return
        args = self.args.copy()
        for i, p, dtype in zip(self.slots, pointers, self.dtypes):
            args[i] = _Pointer(p, dtype) if type(p) is int else p
        self.kernel[self.grid](*args, **self.meta)

    def _fast(self, pointers) -> bool:
        if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            return False
        if torch._C._cuda_getDevice() != self.device:  # torch.cuda.current_device() without its Python layer
            return False
        for p, need, dtype in zip(pointers, self.aligned, self.dtypes):
            if type(p) is int:
                if need and p % 16:
                    return False
            elif p.dtype != dtype or need and p.data_ptr() % 16:
                return False
        return True


def prepare(kernel, grid: Sequence[int], args: Sequence, slots: Sequence[int], **meta) -> Launch:
    """Launch `kernel[grid](*args, **meta)` the ordinary way and return a `Launch` that repeats it with the
    arguments at positions `slots` replaced: pointers, as tensors or as device addresses (ints) of the first call's
    dtypes. Under Triton's interpreter the repeats take its ordinary path.

    `grid` must be a tuple of ints (not a callable); `meta` holds the constexpr arguments and launch options
    (`num_warps`, `num_stages`). The caller guarantees the non-slot arguments still apply when it reuses the
    `Launch` (key its cache on them)."""
    if not isinstance(grid, tuple) or not 1 <= len(grid) <= 3 or any(type(g) is not int for g in grid):
        raise ValueError(f"grid must be a tuple of 1 to 3 ints, got {grid!r}")
    if any(not isinstance(i, int) or not 0 <= i < len(args) for i in slots):
        raise ValueError(f"slots must index args (0..{len(args) - 1}), got {tuple(slots)!r}")
    compiled = kernel[grid](*args, **meta)
    return Launch(kernel, grid, args, meta, slots, compiled)

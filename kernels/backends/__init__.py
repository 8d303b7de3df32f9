"""Backends behind `kernels.attention`, tried in order; each has a `can_run_<name>` predicate.

`triton` (CUDA tensors; its module registers the torch custom ops and imports Triton itself only when a kernel
runs, so CPU-only installs never load Triton) and `reference` (pure torch, always available, the test oracle).
"""
from __future__ import annotations

import importlib

from .reference import attention_reference, can_run_reference

BACKENDS = ("triton", "reference")
_MODULES = {"triton": "kernels.backends.triton_attention"}
_LOADED = {}


def _load(name):
    if name == "reference":
        return can_run_reference, attention_reference
    if name not in _LOADED:  # imported once, eagerly below, so torch.compile never traces an import
        module = importlib.import_module(_MODULES[name])
        _LOADED[name] = getattr(module, f"can_run_{name}"), getattr(module, f"attention_{name}")
    return _LOADED[name]


try:
    _load("triton")
except ImportError:  # no triton kernels on this install; the reference still runs
    pass


def choose_backend(q, k, v, pattern, bias, gate, return_lse, backend=None):
    """Return the attention function of `backend`, or of the first backend that can run these inputs."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        can_run, fn = _load(backend)
        can_run(q, k, v, pattern, bias, gate, return_lse, raise_error=True)
        return fn
    for name in BACKENDS:
        if name == "triton" and not q.is_cuda:
            continue
        try:
            can_run, fn = _load(name)
        except ImportError:
            continue
        if can_run(q, k, v, pattern, bias, gate, return_lse, raise_error=False):
            return fn
    raise NotImplementedError("no attention backend can run these inputs; set logging level DEBUG for "
                              "the 'kernels' logger to see why each was rejected")

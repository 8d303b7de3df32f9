"""The analysis path: attention probabilities of chosen modules, heads and query rows, and an edit hook on them.

Training-free LMM methods read or rewrite post-softmax attention in a few layers: VAR (Visual Attention Sink,
arXiv 2503.03321) moves mass from sink columns to visual tokens in image-centric heads, ACT (arXiv 2406.15765)
recalibrates sink columns in chosen heads, CARVE (arXiv 2509.06461) reads the last query's attention over the
vision span, retrieval-head scoring (arXiv 2404.15574) reads each head's top-1 key. Fast kernels never
materialise the probability matrix, so `capture` recomputes it with the reference math (`backends.reference`)
only for calls made inside the selected modules, and only for the selected heads and rows; every other call
dispatches to its backend as usual.

>>> with kernels.capture(model, ["blocks.3.attn"], heads=[0, 5], rows=-1) as cap:
...     model(x)
>>> cap.records[0].probs.shape  # (B, 2, 1, Nk)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .backends import choose_backend
from .backends.reference import apply_gate, attention_logits, autocast_off, expand_kv, softmax_rows
from .checks import check_attention_args
from .patterns import Dense, Pattern

__all__ = ["capture", "attention_probs", "Capture", "CaptureRecord", "AttentionCall"]

# Open capture contexts. `kernels.attention` looks at the capture stack only while this is > 0, so the op's fast
# path costs one guarded global read (torch.compile traces it without a graph break).
ACTIVE = 0
_LOCAL = threading.local()  # .stack: the selected modules being run in this thread, innermost last


@dataclass
class _CallSite:
    module: str  # qualified name of the selected module the call ran in (the innermost one when they nest)
    forward: int  # which forward of that module, counted from 0 while the capture was open
    call: int  # which `kernels.attention` call within that forward, counted from 0
    shape: Tuple[int, int, int, int]  # the call's (B, H, Nq, Nk)
    heads: torch.Tensor  # selected query heads, int64, negative indices resolved, in the order asked for
    rows: torch.Tensor  # selected query rows, the same way


@dataclass
class AttentionCall(_CallSite):
    """What an edit hook is told about the `kernels.attention` call whose probabilities it receives.

    Besides the call site (`module`, `forward`, `call`, `shape`, and `heads`/`rows` on the inputs' device):
    `visible`, the pattern's `(len(rows), Nk)` boolean mask of the selected rows, and `logits`, the masked
    pre-softmax logits `(B, len(heads), len(rows), Nk)` (differentiable).
    """

    visible: torch.Tensor
    logits: torch.Tensor


@dataclass
class CaptureRecord(_CallSite):
    """One captured `kernels.attention` call.

    Attributes:
        module: qualified name of the selected module the call ran in (the innermost one when selected modules
            nest).
        forward: which forward of that module, counted from 0 while the capture was open.
        call: which `kernels.attention` call within that forward, counted from 0.
        shape: the call's `(B, H, Nq, Nk)`.
        heads, rows: the selected query heads and rows (int64, CPU).
        probs: attention probabilities `(B, len(heads), len(rows), Nk)` before any edit, float32 (float64 for
            float64 inputs); rows with no visible key are zeros.
        logits: masked pre-softmax logits of the same shape (-inf where the pattern hides a key), when asked.
        edited: the probabilities the edit hook returned, when there is one.
    """

    probs: torch.Tensor
    logits: Optional[torch.Tensor] = None
    edited: Optional[torch.Tensor] = None


class _Frame:
    __slots__ = ("capture", "name", "forward", "calls")

    def __init__(self, capture, name, forward):
        self.capture, self.name, self.forward, self.calls = capture, name, forward, 0


def _stack() -> list:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def _open_frames():
    """This thread's frames of still-open captures, innermost first (a capture closed from another thread leaves
    its frames on this thread's stack until the module returns)."""
    return (f for f in reversed(getattr(_LOCAL, "stack", None) or ()) if f.capture.active)


def current_frame() -> Optional[_Frame]:
    """The innermost selected module running in this thread under an open capture, or None."""
    return next(_open_frames(), None)


def handling_frames() -> List[_Frame]:
    """For each open capture with a selected module running in this thread, its innermost frame (innermost
    first): the captures a `kernels.attention` call made now belongs to."""
    frames, seen = [], set()
    for frame in _open_frames():
        if id(frame.capture) not in seen:
            seen.add(id(frame.capture))
            frames.append(frame)
    return frames


def active_frame() -> Optional[_Frame]:
    """`current_frame()` while a capture is open; otherwise None after one global read (compile-friendly)."""
    return current_frame() if ACTIVE else None


# ----------------------------------------------------------------------------------------------- index selections

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_index_spec(name: str, spec, allow_slice: bool) -> None:
    """TypeError unless `spec` is None, an int, a sequence of ints, a 1-d integer tensor (or a slice)."""
    if spec is None or _is_int(spec) or (allow_slice and isinstance(spec, slice)):
        return
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 1 or spec.dtype.is_floating_point or spec.dtype.is_complex or spec.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-d integer tensor, got dtype={spec.dtype} shape={tuple(spec.shape)}")
        return
    if isinstance(spec, (list, tuple, range)) and all(_is_int(i) for i in spec):
        if len(spec) == 0:
            raise ValueError(f"{name} must select at least one index, got an empty {type(spec).__name__}")
        return
    kinds = "None, an int, a slice, a sequence of ints or a 1-d integer tensor" if allow_slice else \
        "None, an int, a sequence of ints or a 1-d integer tensor"
    raise TypeError(f"{name} must be {kinds}, got {spec!r}")


def _resolve_index(name: str, spec, size: int, device, where: str = "") -> torch.Tensor:
    """int64 indices in [0, size) on `device`; ValueError when out of range, repeated or empty."""
    if spec is None:
        return torch.arange(size, device=device)
    if isinstance(spec, slice):
        idx = torch.arange(size)[spec]
    else:
        idx = torch.as_tensor([spec] if _is_int(spec) else spec, dtype=torch.int64).cpu().reshape(-1)
        if idx.numel() and (idx.min() < -size or idx.max() >= size):
            raise ValueError(f"{name} must index {size} entries{where} (in [-{size}, {size})), got {spec!r}")
        idx = idx % size
    if idx.numel() == 0:
        raise ValueError(f"{name} selects no index of {size}{where}, got {spec!r}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"{name} must not repeat an index, got {spec!r}")
    return idx.to(device)


def _visible_rows(pattern: Optional[Pattern], nq: int, nk: int, rows: torch.Tensor, device) -> torch.Tensor:
    """The pattern's mask restricted to `rows`, `(len(rows), nk)`, without the full mask for grid patterns."""
    if pattern is None or isinstance(pattern, Dense):
        return torch.ones(rows.numel(), nk, dtype=torch.bool, device=device)
    axis_masks = getattr(pattern, "axis_masks", None)
    if axis_masks is None:
        return pattern.mask_rows(rows.to(device), nq, nk)
    masks = axis_masks(device)  # per axis (L_q, L_k); the full mask is their outer AND, row-major
    coords = torch.unravel_index(rows, tuple(m.shape[0] for m in masks))
    visible = masks[0].index_select(0, coords[0])
    for m, c in zip(masks[1:], coords[1:]):
        visible = (visible[:, :, None] & m.index_select(0, c)[:, None, :]).reshape(rows.numel(), -1)
    return visible


def _select_bias(bias, q, k, heads, rows, dtype):
    """The additive bias on the selected heads and rows, as a tensor broadcastable to (B, h, r, Nk)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):  # factorized: materialised as the reference path does, then sliced
        bias = bias.materialize(q.to(dtype), expand_kv(k.to(dtype), q.shape[1]))
    b = bias.to(dtype)
    b = b.reshape((1,) * (4 - b.dim()) + tuple(b.shape))  # (B|1, H|1, Nq|1, Nk)
    if b.shape[1] != 1:
        b = b.index_select(1, heads)
    if b.shape[2] != 1:
        b = b.index_select(2, rows)
    return b


def _explicit(q, k, pattern, bias, scale, heads, rows):
    """Reference logits and probabilities of the selected heads/rows: (logits, probs, lse, visible), in the compute
    dtype (float32, or float64 for float64 inputs) also under `torch.autocast`."""
    with autocast_off(q.device.type):
        return _explicit_fp32(q, k, pattern, bias, scale, heads, rows)


def _explicit_fp32(q, k, pattern, bias, scale, heads, rows):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kv_heads = heads // (q.shape[1] // k.shape[1])  # the key/value head each selected query head reads (GQA)
    q_sel = q.index_select(1, heads).index_select(2, rows).to(compute)  # (B, h, r, D)
    k_sel = k.index_select(1, kv_heads).to(compute)  # (B, h, Nk, D)
    bias = _select_bias(bias, q, k, heads, rows, compute)
    logits = attention_logits(q_sel, k_sel, None, bias, scale)  # (B, h, r, Nk)
    visible = _visible_rows(pattern, q.shape[2], k.shape[2], rows, q.device)
    if not bool(visible.all()):
        logits = logits.masked_fill(~visible, float("-inf"))
    probs, lse = softmax_rows(logits)
    return logits, probs, lse, visible


def attention_probs(q: torch.Tensor, k: torch.Tensor, pattern: Optional[Pattern] = None, bias=None,
                    scale: Optional[float] = None, heads=None, rows=None, return_logits: bool = False):
    """Attention probabilities `softmax(q kᵀ · scale + bias)|pattern` from the reference math.

    Args:
        q: queries `(B, H, Nq, D)`.
        k: keys `(B, Hkv, Nk, D)`; `H % Hkv == 0`.
        pattern, bias, scale: as for `kernels.attention`.
        heads: query heads to return (int, sequence, 1-d integer tensor; negative indices count from the end);
            None: all.
        rows: query rows to return (int, slice, sequence, 1-d integer tensor); None: all.
        return_logits: also return the masked logits (-inf where the pattern hides a key).

    Returns:
        `probs (B, len(heads), len(rows), Nk)` in float32 (float64 for float64 inputs; rows with no visible key
        are zeros), and `logits` of the same shape when `return_logits`. Differentiable.
    """
    check_attention_args(q, k, k, pattern, bias, None, scale, raise_error=True)
    _check_index_spec("heads", heads, allow_slice=False)
    _check_index_spec("rows", rows, allow_slice=True)
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {return_logits!r}")
    heads = _resolve_index("heads", heads, q.shape[1], q.device, " (query heads)")
    rows = _resolve_index("rows", rows, q.shape[2], q.device, " (query rows)")
    logits, probs, _, _ = _explicit(q, k, pattern, bias, scale, heads, rows)
    return (probs, logits) if return_logits else probs


# -------------------------------------------------------------------------------------------------------- capture

class Capture:
    """An open-able capture over a model's modules; made by `kernels.capture` (see there)."""

    def __init__(self, model, names, targets, heads, rows, calls, logits, edit, record, offload, detach):
        self.model = model
        self.modules: Tuple[str, ...] = names
        self._targets = targets  # [(name, module)]
        self.heads, self.rows, self.calls = heads, rows, calls
        self.logits, self.edit, self.record, self.offload, self.detach = logits, edit, record, offload, detach
        self.records: List[CaptureRecord] = []
        self._forwards: Dict[str, int] = {}
        self._handles: list = []

    # -- context
    def __enter__(self) -> "Capture":
        global ACTIVE
        if self._handles:
            raise RuntimeError("this capture is already open; open a new kernels.capture(...) to nest")
        for name, module in self._targets:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))
        ACTIVE += 1
        return self

    def __exit__(self, *exc) -> bool:
        global ACTIVE
        if not self._handles:  # already closed
            return False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        stack = _stack()
        stack[:] = [f for f in stack if f.capture is not self]
        ACTIVE -= 1
        return False

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _pre_hook(self, name):
        def hook(module, args):
            forward = self._forwards.get(name, 0)
            self._forwards[name] = forward + 1
            _stack().append(_Frame(self, name, forward))
        return hook

    def _post_hook(self, name):
        def hook(module, args, output):
            stack = _stack()
            for i in range(len(stack) - 1, -1, -1):
                if stack[i].capture is self and stack[i].name == name:
                    del stack[i]
                    break
        return hook

    # -- records
    def find(self, module: Optional[str] = None, forward: Optional[int] = None,
             call: Optional[int] = None) -> List[CaptureRecord]:
        """The records of `module` (all when None), optionally of one forward and one call index."""
        return [r for r in self.records if (module is None or r.module == module)
                and (forward is None or r.forward == forward) and (call is None or r.call == call)]

    def clear(self) -> None:
        """Drop the records and restart the forward counts (e.g. between generation steps)."""
        self.records.clear()
        self._forwards.clear()

    # -- the captured call
    def _heads_for(self, name):
        return self.heads.get(name) if isinstance(self.heads, dict) else self.heads

    def _keep(self, t):
        if t is None:
            return None
        t = t.detach() if self.detach else t
        return t.cpu() if self.offload else t

    def run(self, frame: _Frame, q, k, v, pattern, bias, gate, scale, return_lse, backend):
        call = frame.calls
        frame.calls += 1

        def fast():
            fn = choose_backend(q, k, v, pattern, bias, gate, return_lse, backend)
            return fn(q, k, v, pattern=pattern, bias=bias, gate=gate, scale=scale, return_lse=return_lse)

        if self.calls is not None and call not in self.calls:
            return fast()
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        site = f"of {frame.name!r} call {call}"
        heads = _resolve_index("heads", self._heads_for(frame.name), H, q.device, f" (query heads {site})")
        spec = self.rows
        if callable(spec):  # per call: the function's answer for this call's shape, checked like a fixed spec
            spec = spec(Nq, Nk)
            _check_index_spec("rows", spec, allow_slice=True)
        rows = _resolve_index("rows", spec, Nq, q.device, f" (query rows {site})")
        logits, probs, lse, visible = _explicit(q, k, pattern, bias, scale, heads, rows)
        edited = None
        if self.edit is not None:
            # when recording, the edit gets copies: an in-place edit must not change the "before the edit" record
            keep_logits = self.record and self.logits
            info = AttentionCall(frame.name, frame.forward, call, (B, H, Nq, Nk), heads, rows, visible,
                                 logits.clone() if keep_logits else logits)
            edited = self.edit(probs.clone() if self.record else probs, info)
        if edited is None:  # no edit, or a read-only callback: the output is exactly the normal path's
            result = fast()
        else:
            if not isinstance(edited, torch.Tensor):
                raise TypeError(f"edit must return a tensor of probabilities, got {type(edited).__name__} "
                                f"for {frame.name!r} call {call}")
            if edited.shape != probs.shape or edited.device != probs.device:
                raise ValueError(f"edit must return probabilities of shape {tuple(probs.shape)} on {probs.device}, "
                                 f"got shape {tuple(edited.shape)} on {edited.device} for {frame.name!r} call {call}")
            edited = edited.to(probs.dtype)
            v_sel = v.index_select(1, heads // (H // v.shape[1])).to(probs.dtype)  # (B, h, Nk, Dv)
            with autocast_off(q.device.type):
                out_sel = torch.matmul(edited, v_sel)  # (B, h, r, Dv), in the compute dtype
            if gate is not None:
                out_sel = apply_gate(out_sel, gate.index_select(1, rows).index_select(2, heads))
            whole = heads.numel() == H and rows.numel() == Nq and bool(
                (heads == torch.arange(H, device=heads.device)).all() and
                (rows == torch.arange(Nq, device=rows.device)).all())
            if whole:  # every head and row recomputed: the fast path has nothing left to do
                out = out_sel.to(q.dtype)
                result = (out, lse) if return_lse else out  # lse is float32 (float64 for float64 inputs)
            else:
                result = fast()
                out = result[0] if return_lse else result
                out = out.clone()
                out[:, heads[:, None], rows[None, :]] = out_sel.to(out.dtype)
                result = (out, result[1]) if return_lse else out
        if self.record:
            self.records.append(CaptureRecord(
                frame.name, frame.forward, call, (B, H, Nq, Nk), heads.cpu(), rows.cpu(), self._keep(probs),
                self._keep(logits) if self.logits else None, self._keep(edited)))
        return result


def captured_attention(q, k, v, pattern, bias, gate, scale, return_lse, backend):
    """`kernels.attention` for a call made inside a selected module (inputs already checked). Several open
    captures may select modules running now (nested contexts): read-only ones each record the call; an editing
    capture must be the only one, since which edit applies, and what the others record, would be ambiguous."""
    frames = handling_frames()
    if len(frames) > 1 and any(f.capture.edit is not None for f in frames):
        names = [f"{f.name!r}" + (" (edit)" if f.capture.edit is not None else "") for f in frames]
        raise RuntimeError(f"kernels.capture: {len(frames)} open captures select modules running this attention "
                           f"call ({', '.join(names)}) and one of them edits: nest captures only when none edits, "
                           f"or use one capture with the union of their selections")
    result = None
    for frame in frames:
        result = frame.capture.run(frame, q, k, v, pattern, bias, gate, scale, return_lse, backend)
    return result


def _select_modules(model: nn.Module, modules) -> List[Tuple[str, nn.Module]]:
    named = list(model.named_modules())  # shared modules appear once, under their first name
    if isinstance(modules, str):
        modules = [modules]
    if isinstance(modules, type) or (isinstance(modules, tuple) and modules and
                                     all(isinstance(t, type) for t in modules)):
        if not all(issubclass(t, nn.Module) for t in (modules if isinstance(modules, tuple) else (modules,))):
            raise TypeError(f"modules given as types must be nn.Module subclasses, got {modules!r}")
        chosen = [(n, m) for n, m in named if isinstance(m, modules)]
        what = f"of type {modules!r}"
    elif callable(modules):
        chosen = [(n, m) for n, m in named if modules(n, m)]
        what = "matching the predicate"
    elif isinstance(modules, (list, tuple)) and modules and all(isinstance(n, str) for n in modules):
        by_name = dict(named)
        missing = [n for n in modules if n not in by_name]
        if missing:
            examples = [n for n, _ in named if n][:6]
            raise ValueError(f"modules: {type(model).__name__} has no submodule named {missing[0]!r}; "
                             f"names look like {examples}")
        chosen, seen = [], set()
        for n in modules:
            if id(by_name[n]) not in seen:
                seen.add(id(by_name[n]))
                chosen.append((n, by_name[n]))
        what = f"named {list(modules)}"
    else:
        raise TypeError(f"modules must be a name, a list of names, an nn.Module type (or tuple of types) or a "
                        f"predicate (name, module) -> bool, got {modules!r}")
    if not chosen:
        raise ValueError(f"modules selects no module of {type(model).__name__}: none {what}")
    return chosen


def capture(model: nn.Module, modules: Union[str, Sequence[str], type, Tuple[type, ...], Callable],
            heads=None, rows=None, calls=None, logits: bool = False,
            edit: Optional[Callable[[torch.Tensor, AttentionCall], torch.Tensor]] = None,
            record: bool = True, offload: bool = False, detach: bool = True) -> Capture:
    """Capture (and optionally edit) the attention probabilities of chosen modules, heads and query rows.

    Inside `with kernels.capture(model, ...) as cap:`, each `kernels.attention` call made while a selected module
    runs (through `module(...)`, which fires its hooks) recomputes the probabilities of the selected heads and rows
    with the reference math and appends a `CaptureRecord` to `cap.records`. Calls elsewhere dispatch to their
    backend as usual. Without `edit`, a captured call's output is the normal path's output, untouched. With
    `edit`, the selected heads and rows of the output become `edited_probs @ v` (then the gate), the rest comes from
    the normal path (skipped when every head and row is selected); `lse`, when asked, is that of the unedited
    logits. Works under `torch.no_grad` and with autograd (edits are differentiable; records are detached unless
    `detach=False`).

    A call is handled by the innermost selected module running. Captures may nest (each records the calls of its
    own selection) as long as none of the nested ones edits: a call that an editing capture and another open
    capture both select raises a RuntimeError rather than silently dropping an edit. Captures run eagerly (use the uncompiled model). With non-reentrant gradient checkpointing,
    call backward inside the context so recomputed forwards see the same edits (they also record again).

    Args:
        model: the model (any `nn.Module`); hooks go on its selected submodules while the context is open
            (calls from other threads running them are captured too).
        modules: which submodules: a qualified name or a list of names (`"blocks.3.attn"`, `""` for the model
            itself), an `nn.Module` subclass or tuple of them, or a predicate `(name, module) -> bool`.
        heads: query heads to capture: None (all), an int, a sequence of ints or a 1-d integer tensor (negative
            counts from the end), or a dict from selected module name to one of these (every selected module
            needs an entry; ACT's per-layer head lists).
        rows: query rows (tokens) to capture: None (all), an int (`-1`: the last query), a slice, a sequence of
            ints or a 1-d integer tensor; or a function `rows(nq, nk)` returning one of these per call (the rows
            after an image span in a prefill and the single row of each decode step).
        calls: which `kernels.attention` calls within one forward of a selected module (counted from 0; a module
            such as agent attention calls it twice): None (all), an int or a sequence of ints.
        logits: also record the masked pre-softmax logits.
        edit: `edit(probs, info) -> probs`: receives `probs (B, len(heads), len(rows), Nk)` (float32; float64
            for float64 inputs) and an `AttentionCall`, returns modified probabilities of the same shape and
            device (rows need not sum to 1), or None to leave this call's output as it is (a read-only callback,
            e.g. retrieval-head scoring at each decode step with `record=False`); `edit=None`: read only.
        record: append records (False: only edit, e.g. through a long generation).
        offload: move recorded tensors to the CPU.
        detach: detach recorded tensors from autograd.

    Returns:
        A `Capture` context manager; `cap.records` (list of `CaptureRecord`), `cap.find(module, forward, call)`,
        `cap.clear()`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _select_modules(model, modules)
    names = tuple(n for n, _ in targets)
    if isinstance(heads, dict):
        extra = sorted(set(heads) - set(names), key=str)
        missing = [n for n in names if n not in heads]
        if extra or missing:
            raise ValueError(f"heads given per module must have exactly the selected modules {list(names)} as keys, "
                             f"got extra keys {extra} and missing keys {missing}")
        for n, spec in heads.items():
            _check_index_spec(f"heads[{n!r}]", spec, allow_slice=False)
    else:
        _check_index_spec("heads", heads, allow_slice=False)
    if not callable(rows):
        _check_index_spec("rows", rows, allow_slice=True)
    if calls is not None:
        calls_list = [calls] if _is_int(calls) else calls
        if not isinstance(calls_list, (list, tuple, range)) or not all(_is_int(c) for c in calls_list):
            raise TypeError(f"calls must be None, an int or a sequence of ints, got {calls!r}")
        if not calls_list or min(calls_list) < 0:
            raise ValueError(f"calls must select call indices >= 0 (at least one), got {calls!r}")
        calls = frozenset(calls_list)
    for name, value in (("logits", logits), ("record", record), ("offload", offload), ("detach", detach)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if edit is not None and not callable(edit):
        raise TypeError(f"edit must be a callable (probs, info) -> probs or None, got {type(edit).__name__}")
    return Capture(model, names, targets, heads, rows, calls, logits, edit, record, offload, detach)

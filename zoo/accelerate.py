"""`zoo.accelerate`: swap a timm model's attention layers, in place, for the zoo's layers over `kernels.attention`.

The swapped layer reuses the original layer's parameter objects (same weights, and an optimizer built before the
swap keeps working) and computes the same function; on CUDA it runs on the kernel core's Triton path.

Swapped today: timm's `HaloAttn` (`timm.layers.halo_attn`) -> `zoo.layers.HaloAttention`. Subclasses of a
swappable class are left alone (they may change its behaviour) and reported as skipped.

>>> model, report = zoo.accelerate(timm.create_model("halonet26t"))
>>> print(report)  # zoo.accelerate: swapped 3 module(s) ... stages.2.1.self_attn ...
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple, Type

from torch import nn
from timm.layers.halo_attn import HaloAttn

from .layers.halo_attention import HaloAttention

__all__ = ["accelerate", "AccelerateReport", "Swap"]

logger = logging.getLogger("zoo")


@dataclass(frozen=True)
class Swap:
    """One replaced module: its qualified name in the model and the classes before and after."""

    name: str
    old: str
    new: str


@dataclass
class AccelerateReport:
    """What `accelerate` did: `swapped` modules and `skipped` ones with the reason."""

    swapped: List[Swap] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        counts: Dict[Tuple[str, str], int] = {}
        for s in self.swapped:
            counts[(s.old, s.new)] = counts.get((s.old, s.new), 0) + 1
        lines = [f"zoo.accelerate: swapped {len(self.swapped)} module(s)"]
        lines += [f"  {n} x {old} -> {new}" for (old, new), n in counts.items()]
        lines += [f"  {s.name}" for s in self.swapped]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _halo_from_timm(old: HaloAttn) -> HaloAttention:
    use_avg_pool = isinstance(old.pool, nn.AvgPool2d)
    new = HaloAttention(
        dim=old.q.in_channels,
        dim_out=old.dim_out_v,
        stride=2 if (old.block_stride > 1 or use_avg_pool) else 1,
        num_heads=old.num_heads,
        dim_head=old.dim_head_qk,
        block_size=old.block_size,
        halo_size=old.halo_size,
        qkv_bias=old.q.bias is not None,
        avg_down=use_avg_pool,
        scale_pos_embed=old.scale_pos_embed,
        device="meta",  # every parameter is replaced by the original's below
    )
    if (new.block_stride, new.block_size_ds, new.win_size) != (old.block_stride, old.block_size_ds, old.win_size):
        raise RuntimeError(f"zoo.accelerate: could not reproduce the geometry of {old!r}")
    new.q, new.kv = old.q, old.kv
    new.pos_embed.height_rel = old.pos_embed.height_rel
    new.pos_embed.width_rel = old.pos_embed.width_rel
    return new.train(old.training)


# exact timm class -> converter building the zoo module from it (sharing its parameters)
_CONVERTERS: Dict[Type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    HaloAttn: _halo_from_timm,
}


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _keep_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """Hand the old layer's hooks to its replacement: the same dict objects, so the handles a user holds still
    remove them (feature extractors, `kernels.capture`, profilers registered before the swap keep working)."""
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            setattr(new, attr, hooks)
    return new


def accelerate(model: nn.Module) -> Tuple[nn.Module, AccelerateReport]:
    """Swap a timm model's attention layers, in place, for the zoo's equivalents over `kernels.attention`.

    Each swapped layer keeps the original's parameters (the same tensors) and computes the same outputs.
    The swaps are logged at INFO level on the "zoo" logger.

    Args:
        model: a `torch.nn.Module`, typically a timm model (e.g. `timm.create_model("halonet26t")`). A bare
            `HaloAttn` is accepted too; its replacement is returned.

    Returns:
        `(model, report)`: the model (the same object, modified in place) and an `AccelerateReport` (swapped
        module names, skipped ones and why; `len(report)` is the number of swaps, `str(report)` a summary).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = AccelerateReport()
    swappable = tuple(_CONVERTERS)
    converted = {}  # id(old module) -> its replacement: a module registered under several names is one layer
    skipped = set()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        convert = _CONVERTERS.get(type(module))
        if convert is None:
            if isinstance(module, swappable) and id(module) not in skipped:
                skipped.add(id(module))
                report.skipped.append((name, f"{_qualname(type(module))} subclasses a swappable timm class"))
            continue
        new = converted.get(id(module))
        if new is None:
            new = converted[id(module)] = _keep_hooks(module, convert(module))
        if name:
            model.set_submodule(name, new)
        else:
            model = new
        report.swapped.append(Swap(name, _qualname(type(module)), _qualname(type(new))))
    if report.swapped or report.skipped:
        logger.info("%s", report)
    else:
        logger.info("zoo.accelerate: nothing to swap in %s", type(model).__name__)
    return model, report

"""Train a grid of probes on cached features in one pass: every batch of features feeds every probe (probe types
× learning rates × encoder layers), each with its own optimizer (timm's AdamW/LARS/...) and cosine schedule with
warm-up; every evaluation reads the validation features once for all probes.

Mixed precision (bf16 autocast) on GPU, tqdm progress, periodic top-1/top-5 evaluation, one safetensors
checkpoint with every probe's weights and optimizer state (resumable), metrics as a dict (JSON-able), training
curves as a PNG and a comparison table.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from zoo.probes import create_probe

from .cache import FeatureStore

__all__ = ["ProbeSpec", "TrainConfig", "train_probes", "save_curves", "results_table", "topk_correct"]

CHECKPOINT = "checkpoint.safetensors"
_FORMAT = "attnzoo-probe-checkpoint-1"


@dataclass
class ProbeSpec:
    """One probe of the grid: a probe type with its arguments, trained at one learning rate on the tokens of one
    encoder layer (a block index of the feature store, negative from the end; None: the store's only layer)."""

    name: str
    probe: str
    lr: float
    kwargs: Dict[str, Any] = field(default_factory=dict)
    layer: Optional[int] = None


@dataclass
class TrainConfig:
    """Training hyper-parameters shared by every probe of the grid. Defaults suit small offline runs (AdamW, 30
    epochs); EP's ImageNet protocol (LARS, blr 0.1 at batch 4096, 90 epochs, 10 warm-up) is
    `configs/probe/imagenet_vitb_ep.yaml`."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    eval_every: int = 1
    ckpt_every: int = 1
    amp: bool = True
    device: str = "auto"
    seed: int = 0
    resume: bool = True
    preload: bool = True

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "ckpt_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if self.optimizer not in list_optimizers():
            raise ValueError(f"train.optimizer must be a timm optimizer name (adamw, lars, sgd, ...), "
                             f"got {self.optimizer!r}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError(f"warmup_epochs, weight_decay and min_lr must be >= 0, got {self.warmup_epochs=} "
                             f"{self.weight_decay=} {self.min_lr=}")


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> List[int]:
    """How many rows have the target among the k highest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # (B, kmax)
    hit = top == target[:, None]
    return [int(hit[:, :min(k, logits.shape[-1])].any(-1).sum()) for k in ks]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Features:
    """Cached features of the chosen layers as torch tensors (preloaded, float16) or gathered from the memmaps per
    batch; `batch` gives one tensor per entry of `positions` (indices into the store's layers)."""

    def __init__(self, store: FeatureStore, positions: Sequence[int], device: torch.device, preload: bool):
        self.store = store
        self.device = device
        self.arrays = [store.arrays[i] for i in positions]
        self.labels = torch.tensor(np.array(store.labels), dtype=torch.long)
        self.data = [torch.from_numpy(np.array(a)).to(device) for a in self.arrays] if preload else None

    def batch(self, idx: torch.Tensor, views: Optional[torch.Tensor] = None):
        if views is None:
            views = torch.zeros_like(idx)
        if self.data is not None:
            xs = [d[idx.to(self.device), views.to(self.device)] for d in self.data]
        else:
            order = torch.argsort(idx)  # memmap reads in file order
            xs = []
            for a in self.arrays:
                rows = np.asarray(a[idx[order].numpy(), views[order].numpy()])
                x = torch.empty((len(idx), *rows.shape[1:]), dtype=torch.float16)
                x[order] = torch.from_numpy(rows)
                xs.append(x.to(self.device, non_blocking=True))
        return [x.float() for x in xs], self.labels[idx].to(self.device)


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer):
    tensors, extra = {}, {}
    sd = optimizer.state_dict()
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "extra_state": extra}


def _unflatten_optimizer(prefix: str, tensors: Dict[str, torch.Tensor], info: Dict[str, Any]):
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info["extra_state"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": info["param_groups"]}


def _create_optimizer(probe: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer for the probe. LARS follows MAE's (used by the EP protocol): weight decay and the trust
    ratio on matrices only, whatever the weight decay (timm's `Lars` adapts only when decay is non-zero unless
    `always_adapt`); biases, norms and query vectors take plain momentum SGD steps."""
    if cfg.optimizer.lower() != "lars":
        return create_optimizer_v2(probe, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    params = [p for p in probe.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=cfg.weight_decay, always_adapt=True),
              dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, always_adapt=False)]
    return create_optimizer_v2([g for g in groups if g["params"]], opt="lars", lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)


def _batch_bounds(n: int, batch_size: int) -> List[tuple]:
    """(start, stop) of each training batch of an epoch: `batch_size` rows each, the remainder last, except that a
    remainder of one row joins the batch before it (BatchNorm cannot normalise a batch of one)."""
    bounds = [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class _Run:
    def __init__(self, spec: ProbeSpec, slot: int, block: Optional[int], dim: int, num_classes: int,
                 num_prefix_tokens: int, cfg: TrainConfig, steps_per_epoch: int, device: torch.device):
        self.spec = spec
        self.slot = slot  # which of the loaded layers' tensors feeds this probe
        self.block = block
        # each probe's initial weights come from its own seed (the run's seed and its name), so a probe trains the
        # same whichever other probes share the grid and in whatever order
        torch.manual_seed(cfg.seed + zlib.crc32(spec.name.encode()))
        self.probe = create_probe(spec.probe, dim, num_classes, num_prefix_tokens=num_prefix_tokens,
                                  **spec.kwargs).to(device)
        self.params = sum(p.numel() for p in self.probe.parameters() if p.requires_grad)
        self.optimizer = _create_optimizer(self.probe, cfg, spec.lr)
        total = cfg.epochs * steps_per_epoch
        warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total - 1, 0))
        # MAE/EP schedule: linear warm-up from 0, then a half cosine over the remaining steps
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(total - warmup, 1), lr_min=cfg.min_lr,
                                           warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                                           t_in_epochs=False)
        self.history: List[Dict[str, Any]] = []
        self.seconds = 0.0
        self.loss_sum = 0.0
        self.loss_count = 0


@torch.no_grad()
def _evaluate(runs: List[_Run], feats: _Features, batch_size: int, amp: bool) -> Dict[str, Dict[str, float]]:
    """Top-1/top-5/loss of every run in `runs`, reading each validation batch once for all of them."""
    for run in runs:
        run.probe.eval()
    n = len(feats.labels)
    sums = {run.spec.name: [0.0, 0, 0] for run in runs}  # loss, top-1 hits, top-5 hits
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(n, lo + batch_size))
        xs, y = feats.batch(idx)
        for run in runs:
            with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = run.probe(xs[run.slot]).float()
            c1, c5 = topk_correct(logits, y, (1, 5))
            acc = sums[run.spec.name]
            acc[0] += float(F.cross_entropy(logits, y, reduction="sum"))
            acc[1] += c1
            acc[2] += c5
    return {name: {"val_loss": loss / n, "val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n}
            for name, (loss, c1, c5) in sums.items()}


def _save_checkpoint(path: str, runs: List[_Run], epoch: int, step: int, gen: torch.Generator,
                     signature: Dict[str, Any]) -> None:
    tensors: Dict[str, torch.Tensor] = {"rng.data": gen.get_state(), "rng.torch": torch.get_rng_state()}
    info: Dict[str, Any] = {}
    for run in runs:
        name = run.spec.name
        for k, v in run.probe.state_dict().items():
            tensors[f"runs.{name}.probe.{k}"] = v.detach().cpu().contiguous()
        opt_tensors, opt_info = _flatten_optimizer(f"runs.{name}.optim", run.optimizer)
        tensors.update(opt_tensors)
        info[name] = {"optimizer": opt_info, "history": run.history, "seconds": run.seconds}
    metadata = {"format": _FORMAT, "epoch": str(epoch), "step": str(step),
                "signature": json.dumps(signature, sort_keys=True), "runs": json.dumps(info, default=float)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _load_checkpoint(path: str, runs: List[_Run], gen: torch.Generator, signature: Dict[str, Any]):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not a probe checkpoint (format {metadata.get('format')!r})")
    saved = json.loads(metadata["signature"])
    if saved != json.loads(json.dumps(signature, sort_keys=True)):
        raise ValueError(f"checkpoint {path!r} was written for a different probe grid or training config; "
                         f"use another output_dir or resume=False. Saved: {saved}, now: {signature}")
    tensors = load_file(path)
    info = json.loads(metadata["runs"])
    for run in runs:
        name = run.spec.name
        prefix = f"runs.{name}.probe."
        run.probe.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        run.optimizer.load_state_dict(_unflatten_optimizer(f"runs.{name}.optim", tensors, info[name]["optimizer"]))
        run.history = info[name]["history"]
        run.seconds = info[name]["seconds"]
    gen.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(metadata["epoch"]), int(metadata["step"])


def train_probes(specs: Sequence[ProbeSpec], train_store: FeatureStore, val_store: FeatureStore,
                 cfg: TrainConfig, output_dir: str, progress: bool = True, return_probes: bool = False):
    """Train every probe in `specs` on the same stream of cached-feature batches.

    Args:
        specs: the grid (unique names); each spec's `layer` must be stored in both stores.
        train_store, val_store: finished feature stores of the same encoder and layers; the training store may
            hold several (augmented) views per sample, one drawn at random per sample and epoch.
        cfg: shared training hyper-parameters.
        output_dir: where `checkpoint.safetensors` goes (and is resumed from when `cfg.resume`).
        progress: show a tqdm bar.
        return_probes: also return the trained probe modules.

    Returns:
        metrics `{"runs": {name: {top1, top5, best_top1, params, layer, block, history, ...}},
        "resumed_from_epoch": ...}`
        (JSON-able), and `{name: probe}` when `return_probes`.
    """
    cfg.check()
    if not specs:
        raise ValueError("specs must name at least one probe")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"probe names must be unique, got {names}")
    if train_store.layers != val_store.layers or train_store.num_classes != val_store.num_classes or \
            [a.shape[-1] for a in train_store.arrays] != [a.shape[-1] for a in val_store.arrays]:
        raise ValueError(f"train and val stores differ: layers {train_store.layers} vs {val_store.layers}, dims "
                         f"{[a.shape[-1] for a in train_store.arrays]} vs {[a.shape[-1] for a in val_store.arrays]}, "
                         f"classes {train_store.num_classes} vs {val_store.num_classes}")
    positions = [train_store.layer_index(s.layer) for s in specs]  # ValueError for a layer the store lacks
    used = sorted(set(positions))  # only the layers some probe reads are loaded
    device = _resolve_device(cfg.device)
    amp = bool(cfg.amp and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train_store)
    if n < 2:
        raise ValueError(f"training needs at least 2 samples (the probes' BatchNorm), got {n}")
    batches = _batch_bounds(n, cfg.batch_size)
    steps_per_epoch = len(batches)
    runs = [_Run(s, used.index(pos), train_store.layer_block(s.layer), int(train_store.arrays[pos].shape[-1]),
                 train_store.num_classes, train_store.num_prefix_tokens, cfg, steps_per_epoch, device)
            for s, pos in zip(specs, positions)]
    # a spec without a layer signs as before layers existed, so older checkpoints still resume
    signature = {"specs": [{k: v for k, v in asdict(s).items() if k != "layer" or v is not None} for s in specs],
                 "train": {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "eval_every", "ckpt_every",
                                                                             "resume", "device", "preload")},
                 "train_store": os.path.basename(train_store.path), "val_store": os.path.basename(val_store.path)}
    os.makedirs(output_dir, exist_ok=True)
    ckpt_path = os.path.join(output_dir, CHECKPOINT)
    start_epoch, step = 0, 0
    if cfg.resume and os.path.isfile(ckpt_path):
        start_epoch, step = _load_checkpoint(ckpt_path, runs, gen, signature)
        if start_epoch > cfg.epochs:
            raise ValueError(f"checkpoint {ckpt_path!r} has already trained {start_epoch} epochs, more than "
                             f"train.epochs={cfg.epochs}: use a new output_dir (--output-dir) or train.resume=false")
    train_feats = _Features(train_store, used, device, cfg.preload)
    val_feats = _Features(val_store, used, device, cfg.preload)

    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=min(step, cfg.epochs * steps_per_epoch), desc="probes",
               disable=not progress, leave=False)
    for epoch in range(start_epoch, cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        views = torch.randint(train_store.views, (n,), generator=gen)
        for run in runs:
            run.probe.train()
            run.loss_sum, run.loss_count = 0.0, 0
        for lo, hi in batches:
            idx = perm[lo:hi]
            xs, y = train_feats.batch(idx, views[idx])  # loaded once, used by every probe
            for run in runs:
                t0 = time.perf_counter()
                run.scheduler.step_update(num_updates=step)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(run.probe(xs[run.slot]).float(), y)
                run.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                run.optimizer.step()
                run.loss_sum += loss.item() * len(idx)
                run.loss_count += len(idx)
                run.seconds += time.perf_counter() - t0
            step += 1
            bar.update(1)
        last = epoch + 1 == cfg.epochs
        evaluated = _evaluate(runs, val_feats, cfg.batch_size, amp) if (epoch + 1) % cfg.eval_every == 0 or last \
            else {}
        for run in runs:
            entry = {"epoch": epoch + 1, "step": step, "train_loss": run.loss_sum / max(run.loss_count, 1),
                     "lr": run.optimizer.param_groups[0]["lr"]}
            entry.update(evaluated.get(run.spec.name, {}))
            run.history.append(entry)
        evals = {r.spec.name: [h["val_top1"] for h in r.history if "val_top1" in h] for r in runs[:4]}
        bar.set_postfix({name: f"{v[-1]:.1f}" for name, v in evals.items() if v})
        if (epoch + 1) % cfg.ckpt_every == 0 or last:
            _save_checkpoint(ckpt_path, runs, epoch + 1, step, gen, signature)
    bar.close()

    results = {}
    for run in runs:
        evals = [h for h in run.history if "val_top1" in h]
        best = max(evals, key=lambda h: h["val_top1"]) if evals else {}
        final = evals[-1] if evals else {}
        results[run.spec.name] = {
            "probe": run.spec.probe, "kwargs": run.spec.kwargs, "lr": run.spec.lr, "optimizer": cfg.optimizer,
            "layer": run.spec.layer if run.spec.layer is not None else run.block, "block": run.block,
            "params": run.params, "top1": final.get("val_top1"), "top5": final.get("val_top5"),
            "best_top1": best.get("val_top1"), "best_epoch": best.get("epoch"), "train_seconds": run.seconds,
            "history": run.history,
        }
    metrics = {"runs": results, "epochs": cfg.epochs, "resumed_from_epoch": start_epoch, "device": str(device),
               "amp": amp, "checkpoint": ckpt_path}
    if return_probes:
        return metrics, {r.spec.name: r.probe for r in runs}
    return metrics


def results_table(metrics: Dict[str, Any], title: str = "probes"):
    """A rich Table comparing the probes (layer, params, top-1/top-5, best, seconds), and the same as markdown.

    The layer column names the encoder block each probe read: "final" for the encoder's output, else the block
    index, followed by the index as the config gave it when that counted from the end (`3 (-3)`).
    """
    from rich import box
    from rich.table import Table

    cols = ("probe", "type", "layer", "lr", "params", "top-1", "top-5", "best (ep)", "train s")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for c in cols:  # in a narrow terminal the probe names fold, the numbers stay whole
        table.add_column(c, justify="left" if c in ("probe", "type", "layer") else "right",
                         overflow="fold" if c == "probe" else "ellipsis", no_wrap=c != "probe",
                         min_width=min(12, max(map(len, metrics["runs"]))) if c == "probe" else None)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    def layer(r):
        block, given = r.get("block"), r.get("layer")
        if block is None:
            return "final"
        return str(block) if given is None or given == block else f"{block} ({given})"

    for name, r in sorted(metrics["runs"].items(), key=lambda kv: -(kv[1]["top1"] or 0.0)):
        row = (name, r["probe"], layer(r), f"{r['lr']:g}", f"{r['params'] / 1e3:.1f}k", fmt(r["top1"]), fmt(r["top5"]),
               f"{fmt(r['best_top1'])} ({r['best_epoch']})", f"{r['train_seconds']:.1f}")
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    return table, "\n".join(lines) + "\n"


def save_curves(metrics: Dict[str, Any], path: str) -> None:
    """Training loss and validation top-1 per epoch for every probe, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in metrics["runs"].items():
        h = r["history"]
        ax_loss.plot([e["epoch"] for e in h], [e["train_loss"] for e in h], label=name)
        ev = [e for e in h if "val_top1" in e]
        ax_acc.plot([e["epoch"] for e in ev], [e["val_top1"] for e in ev], marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

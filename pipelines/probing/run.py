"""A probing run from one config: encoder by name → data → cached features → a grid of probes → metrics JSON,
checkpoint, curves PNG and a comparison table. `run_probe(config_dict)` is the API; `zoo probe` the command.

Config (YAML; every key optional except `encoder.name` and `data.kind`; see configs/probe/*.yaml):

    name: digits_ep
    output_dir: out/probe/digits_ep          # metrics.json, results.md, curves.png, checkpoint.safetensors
    seed: 0
    progress: true
    encoder:
      name: "timm:test_vit"
      checkpoint: null
      kwargs: {img_size: 64}
      data_config: {}
      layers: null                           # blocks to probe, e.g. [-1, -4] (negative: from the end); null:
      norm_layers: false                     #   the final output; norm_layers: apply the final norm to them
    data:
      kind: image_folder                     # image_folder | video_folder | digits | arrays
      root: path/to/folder                   # folders: root/<class>/<file>
      train_split: null                      # text files of relative paths; else root/train + root/val;
      val_split: null                        #   else a stratified split of root by val_fraction
      val_fraction: 0.25
      num_frames: 8                          # videos: frames sampled uniformly with decord
      temporal_pool: mean                    # videos: mean | concat per-frame tokens over time
      images: null                           # arrays: (N, H, W[, C]) uint8 or [0, 1] floats, and labels (N,)
      labels: null
    cache: {dir: null, batch_size: 64, num_workers: 0, train_views: 1, augment: false, dtype: float16}
    probes:                                  # the grid: every probe × every lr × every layer
      - {type: linear, pool: cls}
      - {type: ep, num_queries: 32, d_out: 1}  # an entry may narrow the axes: lr: [...], layers: [...]
    train: {epochs: 30, batch_size: 128, optimizer: adamw, lr: [1e-3], blr: null, weight_decay: 0.0,
            warmup_epochs: 1, eval_every: 1, ckpt_every: 1, amp: true, device: auto, resume: true}

`encoder.layers` caches the tokens of those blocks (one encoder pass gives all of them; the store is keyed by
them) and adds a layers axis to the grid; probes are named `TYPE@L<layer>@lr<lr>` where an axis has several
values, and the results table has a layer column. `train.blr` (if set) replaces `lr` with
`blr · batch_size / 256` (the MAE/EP scaling rule). `cache.augment` (true or a dict of
`timm.data.create_transform` training arguments) caches `train_views` augmented views of each training sample;
one is drawn per sample and epoch.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Dict, List, Optional

import re

import numpy as np
import torch
import yaml

from zoo.probes import create_encoder, create_probe, list_probes

from .cache import TEMPORAL_POOLS, extract_features, stored_prefix_tokens
from .data import ArrayDataset, ImageFolderDataset, VideoFolderDataset, build_transform, digits_dataset, \
    stratified_split
from .trainer import ProbeSpec, TrainConfig, results_table, save_curves, train_probes

__all__ = ["DEFAULT_CONFIG", "DATA_KINDS", "load_config", "merge_config", "apply_overrides", "run_probe"]

DATA_KINDS = ("image_folder", "video_folder", "digits", "arrays")

DEFAULT_CONFIG: Dict[str, Any] = {
    "name": "probe",
    "output_dir": None,
    "seed": 0,
    "progress": True,
    "encoder": {"name": None, "checkpoint": None, "kwargs": {}, "data_config": {}, "layers": None,
                "norm_layers": False},
    "data": {"kind": None, "root": None, "train_split": None, "val_split": None, "val_fraction": 0.25,
             "num_frames": 8, "temporal_pool": "mean", "images": None, "labels": None},
    "cache": {"dir": None, "batch_size": 64, "num_workers": 0, "train_views": 1, "augment": False,
              "dtype": "float16"},
    "probes": [{"type": "linear", "pool": "cls"}, {"type": "ep"}],
    "train": {"epochs": 30, "batch_size": 128, "optimizer": "adamw", "lr": [1e-3], "blr": None,
              "weight_decay": 0.0, "momentum": 0.9, "warmup_epochs": 1.0, "min_lr": 0.0, "eval_every": 1,
              "ckpt_every": 1, "amp": True, "device": "auto", "resume": True, "preload": True},
}


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads `1e-3` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def merge_config(base: Dict[str, Any], override: Dict[str, Any], path: str = "") -> Dict[str, Any]:
    """`base` updated by `override`, recursively; a key `base` does not have is an error (typos fail loudly)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise ValueError(f"unknown config key {where!r}; expected one of {sorted(base)}")
        if isinstance(base[key], dict) and key not in ("kwargs", "data_config"):
            if not isinstance(value, dict):
                raise TypeError(f"config key {where!r} must be a mapping, got {type(value).__name__}")
            out[key] = merge_config(base[key], value, where + ".")
        else:
            out[key] = value
    return out


def apply_overrides(config: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply `a.b.c=VALUE` overrides (VALUE parsed as YAML) to a raw config dict."""
    config = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a mapping")
        node[parts[-1]] = _yaml(raw)
    return config


def load_config(path: str, overrides: List[str] = ()) -> Dict[str, Any]:
    """Read a YAML config and apply command-line overrides."""
    if not os.path.isfile(path):
        raise ValueError(f"config must be a YAML file, got {path!r}")
    with open(path) as f:
        config = _yaml(f.read()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path!r} must be a mapping at the top level, got {type(config).__name__}")
    return apply_overrides(config, list(overrides))


def _datasets(data: Dict[str, Any], seed: int):
    kind = data["kind"]
    if kind not in DATA_KINDS:
        raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {kind!r}")
    if kind in ("digits", "arrays"):
        if kind == "digits":
            full = digits_dataset()
        else:
            if data["images"] is None or data["labels"] is None:
                raise ValueError("data.kind='arrays' needs data.images and data.labels")
            full = ArrayDataset(data["images"], data["labels"])
        tr, va = stratified_split(full.targets, data["val_fraction"], seed)
        return full.select(tr), full.select(va)
    root = data["root"]
    if root is None or not os.path.isdir(root):
        raise ValueError(f"data.root must be an existing folder for data.kind={kind!r}, got {root!r}")

    def make(folder, split=None, classes=None):
        if kind == "video_folder":
            return VideoFolderDataset(folder, num_frames=data["num_frames"], split_file=split, classes=classes)
        return ImageFolderDataset(folder, split_file=split, classes=classes)

    if data["train_split"] or data["val_split"]:
        if not (data["train_split"] and data["val_split"]):
            raise ValueError("data.train_split and data.val_split must be given together")
        train = make(root, data["train_split"])
        return train, make(root, data["val_split"], classes=train.classes)
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        train = make(os.path.join(root, "train"))
        return train, make(os.path.join(root, "val"), classes=train.classes)
    full = make(root)
    tr, va = stratified_split(full.targets, data["val_fraction"], seed)
    return full.select(tr), full.select(va)


def _grid(probes: List[Dict[str, Any]], lrs: List[float], layers: Optional[List[int]] = None) -> List[ProbeSpec]:
    """Every probe entry × its learning rates × its layers (an entry's own `lr`/`layers` narrow the axes)."""
    if not isinstance(probes, list) or not probes:
        raise ValueError(f"probes must be a non-empty list of {{type: ..., ...}} entries, got {probes!r}")
    specs, seen = [], {}
    for entry in probes:
        if not isinstance(entry, dict) or entry.get("type") not in list_probes():
            raise ValueError(f"each probe needs type in {list_probes()}, got {entry!r}")
        kwargs = {k: v for k, v in entry.items() if k not in ("type", "name", "lr", "layers")}
        base = entry.get("name") or entry["type"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            base = f"{base}{seen[base]}"
        entry_lrs = entry.get("lr", lrs)
        entry_lrs = entry_lrs if isinstance(entry_lrs, list) else [entry_lrs]
        if "layers" in entry:
            if layers is None:
                raise ValueError(f"probes entry {base!r} sets layers but encoder.layers is not set: {entry!r}")
            entry_layers = entry["layers"]
            if not isinstance(entry_layers, list) or not entry_layers or \
                    not all(isinstance(i, int) and not isinstance(i, bool) for i in entry_layers):
                raise ValueError(f"probes entry {base!r}: layers must be a non-empty list of ints, got "
                                 f"{entry_layers!r}")
        else:
            entry_layers = list(layers) if layers is not None else [None]
        for layer in entry_layers:
            for lr in entry_lrs:
                name = base + (f"@L{layer}" if len(entry_layers) > 1 else "") + \
                    (f"@lr{float(lr):g}" if len(entry_lrs) > 1 else "")
                specs.append(ProbeSpec(name=name, probe=entry["type"], lr=float(lr), kwargs=kwargs, layer=layer))
    return specs


def _jsonable_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy({k: v for k, v in cfg.items() if k != "data"})
    out["data"] = {k: (f"<array {np.shape(v)}>" if k in ("images", "labels") and v is not None else v)
                   for k, v in cfg["data"].items()}
    return out


def run_probe(config: Dict[str, Any]) -> Dict[str, Any]:
    """Run one probing config end to end and return its metrics (also written to `output_dir/metrics.json`).

    Args:
        config: a config mapping (see the module docstring); missing keys take `DEFAULT_CONFIG`'s values.

    Returns:
        `{"name", "encoder", "runs": {probe: {top1, top5, best_top1, params, history, ...}}, "cache": {...},
        "outputs": {...}, ...}`.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    cfg = merge_config(DEFAULT_CONFIG, config)
    if not cfg["encoder"]["name"]:
        raise ValueError("encoder.name is required, e.g. 'timm:vit_base_patch16_224' or 'open_clip:ViT-B-32'")
    if cfg["data"]["temporal_pool"] not in TEMPORAL_POOLS:
        raise ValueError(f"data.temporal_pool must be one of {TEMPORAL_POOLS}, got {cfg['data']['temporal_pool']!r}")
    out_dir = cfg["output_dir"] or os.path.join("out", "probe", cfg["name"])
    cache_dir = cfg["cache"]["dir"] or os.path.join(out_dir, "cache")
    os.makedirs(out_dir, exist_ok=True)
    progress = bool(cfg["progress"])
    seed = int(cfg["seed"])
    tcfg = dict(cfg["train"])
    lrs = tcfg.pop("lr")
    blr = tcfg.pop("blr")
    if blr is not None:
        blrs = blr if isinstance(blr, list) else [blr]
        lrs = [float(b) * tcfg["batch_size"] / 256 for b in blrs]
    lrs = lrs if isinstance(lrs, list) else [lrs]
    train_cfg = TrainConfig(seed=seed, **tcfg)
    train_cfg.check()
    enc = cfg["encoder"]
    layers = enc["layers"]
    if layers is not None and (not isinstance(layers, list) or not layers):
        raise ValueError(f"encoder.layers must be null or a non-empty list of block indices such as [-1, -2], "
                         f"got {layers!r}")
    if layers is None and enc["norm_layers"]:
        raise ValueError("encoder.norm_layers needs encoder.layers")
    specs = _grid(cfg["probes"], [float(x) for x in lrs], layers)

    # 1. encoder and data
    encoder = create_encoder(enc["name"], checkpoint_path=enc["checkpoint"], data_config=enc["data_config"] or None,
                             **(enc["kwargs"] or {}))
    if layers is not None:  # fail before extraction: bad indices, or an entry's layer the cache will not hold
        blocks = encoder.resolve_layers(layers)
        for spec in specs:
            if encoder.resolve_layers([spec.layer])[0] not in blocks:
                raise ValueError(f"probe {spec.name!r}: layer {spec.layer} is not among encoder.layers {layers}")
    train_ds, val_ds = _datasets(cfg["data"], seed)
    for spec in specs:  # fail before extraction: each probe's arguments, checked by building it (no memory)
        try:
            create_probe(spec.probe, encoder.embed_dim, len(train_ds.classes),
                         num_prefix_tokens=stored_prefix_tokens(encoder, layers is not None), device="meta",
                         **spec.kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"probe {spec.name!r}: {err}") from err

    # 2. cached features (train: `train_views` augmented views when augmenting; val: the eval transform)
    c = cfg["cache"]
    augment = c["augment"]
    if augment is False or augment is None:
        if c["train_views"] != 1:
            raise ValueError(f"cache.train_views > 1 needs cache.augment (identical views otherwise), "
                             f"got train_views={c['train_views']}")
        train_tf, train_desc = build_transform(encoder.data_config, train=False)
    else:
        train_tf, train_desc = build_transform(encoder.data_config, train=True,
                                               augment=augment if isinstance(augment, dict) else None)
    val_tf, val_desc = build_transform(encoder.data_config, train=False)
    extract_device = train_cfg.device if train_cfg.device != "auto" else None
    if extract_device is None:
        extract_device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(temporal_pool=cfg["data"]["temporal_pool"], batch_size=c["batch_size"],
                  num_workers=c["num_workers"], device=extract_device, progress=progress, layers=layers,
                  norm_layers=bool(enc["norm_layers"]), dtype=c["dtype"])
    t0 = time.perf_counter()
    train_store = extract_features(encoder, train_ds, train_tf, train_desc, cache_dir, views=c["train_views"],
                                   seed=seed, desc="train features", **common)
    val_store = extract_features(encoder, val_ds, val_tf, val_desc, cache_dir, views=1, seed=seed,
                                 desc="val features", **common)
    cache_seconds = time.perf_counter() - t0

    # 3. the grid of probes (types × lrs × layers), in one pass over the cached features
    metrics = train_probes(specs, train_store, val_store, train_cfg, out_dir, progress=progress)

    # 4. outputs
    metrics.update({
        "name": cfg["name"], "encoder": encoder.name, "embed_dim": encoder.embed_dim,
        "num_prefix_tokens": train_store.num_prefix_tokens, "num_classes": train_store.num_classes,
        "num_train": len(train_store), "num_val": len(val_store), "chance_top1": 100.0 / train_store.num_classes,
        "cache": {"dir": cache_dir, "train": train_store.path, "val": val_store.path,
                  "seconds_this_run": cache_seconds, "token_shape": list(train_store.features.shape[2:]),
                  "layers": None if train_store.layers is None else list(train_store.layers),
                  "token_shapes": [list(a.shape[2:]) for a in train_store.arrays]},
        "config": _jsonable_config(cfg),
    })
    table, markdown = results_table(metrics, title=f"{cfg['name']}: probes on {encoder.name}")
    outputs = {k: os.path.join(out_dir, f) for k, f in
               (("metrics", "metrics.json"), ("curves", "curves.png"), ("table", "results.md"))}
    outputs["checkpoint"] = metrics["checkpoint"]
    metrics["outputs"] = outputs
    save_curves(metrics, outputs["curves"])
    with open(outputs["table"], "w") as f:
        f.write(f"# {cfg['name']}: probes on {encoder.name}\n\n{markdown}")
    tmp = outputs["metrics"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    os.replace(tmp, outputs["metrics"])
    if progress:
        from rich.console import Console

        Console().print(table)
    return metrics

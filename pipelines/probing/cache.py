"""The feature cache: encoder tokens extracted once into a memory-mapped fp16 store, keyed by encoder, data,
transform, views and layers; reused by every probe; extraction resumes where an interruption left it.

A store is a folder `<cache_dir>/<key>/` holding
    features.npy  (S, V, N, D) float16 (or float32), a numpy memmap: S samples, V views, N tokens of width D, of the
                  encoder's final output; or, when layers were chosen, one file per block b:
    features_block<b>.npy  (S, V, N_b, D_b), all written by the same pass of the encoder
    labels.npy    (S,) int64
    done.npy      (chunks,) bool: which extraction chunks are written (flushed after the chunk's features)
    meta.json     what the key was made of, the shapes, `num_prefix_tokens`, `layers` (absolute block indices,
                  in the order asked for; absent for the final output), `num_encoder_layers` and `complete`
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ViewDataset

__all__ = ["FeatureStore", "cache_key", "extract_features", "pool_time", "TEMPORAL_POOLS"]

FORMAT_VERSION = 1
TEMPORAL_POOLS = ("mean", "concat")


def cache_key(description: Dict[str, Any]) -> str:
    """A stable 24-hex-digit key of a JSON-able description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]


def pool_time(tokens: torch.Tensor, num_prefix_tokens: int, mode: str) -> torch.Tensor:
    """Per-frame tokens `(B, T, N, D)` to clip tokens: "mean" over time `(B, N, D)`, or "concat" over time
    `(B, T·N, D)` with every frame's prefix tokens first (so the clip has `T·num_prefix_tokens` of them)."""
    if mode == "mean":
        return tokens.mean(1)
    if mode == "concat":
        p = num_prefix_tokens
        return torch.cat([tokens[:, :, :p].flatten(1, 2), tokens[:, :, p:].flatten(1, 2)], dim=1)
    raise ValueError(f"temporal_pool must be one of {TEMPORAL_POOLS}, got {mode!r}")


def _feature_files(blocks: Optional[Sequence[int]]) -> List[str]:
    return ["features.npy"] if blocks is None else [f"features_block{b}.npy" for b in blocks]


@dataclass
class FeatureStore:
    """A finished feature store; `features` `(S, V, N, D)` float16 (or float32) and `labels` `(S,)` are memmaps.

    A store of chosen layers holds one array per layer (`layer_features(layer)`); `features` is the first one.
    """

    path: str
    features: np.ndarray
    labels: np.ndarray
    meta: Dict[str, Any]
    arrays: Tuple[np.ndarray, ...] = ()

    def __post_init__(self):
        if not self.arrays:
            self.arrays = (self.features,)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.meta["num_prefix_tokens"])

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])

    @property
    def layers(self) -> Optional[Tuple[int, ...]]:
        """The absolute block indices stored, in order; None for a store of the encoder's final output."""
        layers = self.meta.get("layers")
        return None if layers is None else tuple(int(b) for b in layers)

    def layer_index(self, layer: Optional[int]) -> int:
        """Position in `arrays` of `layer` (a block index, negative from the end; None: the only array)."""
        if layer is None:
            if len(self.arrays) != 1:
                raise ValueError(f"layer must be one of {list(self.layers)} for store {self.path!r}, which holds "
                                 f"{len(self.arrays)} layers; got None")
            return 0
        if self.layers is None:
            raise ValueError(f"layer must be None for store {self.path!r} (the encoder's final output, no chosen "
                             f"layers); got {layer!r}")
        n = int(self.meta["num_encoder_layers"])
        block = layer + n if isinstance(layer, int) and layer < 0 else layer
        if block not in self.layers:
            raise ValueError(f"layer must be one of the stored blocks {list(self.layers)} (of {n}; negative counts "
                             f"from the end) in store {self.path!r}, got {layer!r}")
        return self.layers.index(block)

    def layer_block(self, layer: Optional[int]) -> Optional[int]:
        """The absolute block index of `layer` (None for a store of the final output)."""
        return None if self.layers is None else self.layers[self.layer_index(layer)]

    def layer_features(self, layer: Optional[int] = None) -> np.ndarray:
        """`(S, V, N, D)` features of `layer` (see `layer_index`)."""
        return self.arrays[self.layer_index(layer)]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def open(cls, path: str) -> "FeatureStore":
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if not meta.get("complete"):
            raise ValueError(f"feature store {path!r} is incomplete; run extract_features again to resume it")
        arrays = tuple(np.load(os.path.join(path, name), mmap_mode="r") for name in _feature_files(meta.get("layers")))
        labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")
        return cls(path, arrays[0], labels, meta, arrays)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def stored_prefix_tokens(encoder, layers: bool) -> int:
    """Prefix (CLS/register) tokens per image in a store: the final output's, or the blocks' when `layers`."""
    return int(encoder.num_prefix_tokens if not layers else encoder.layer_prefix_tokens)


def extract_features(encoder, dataset, transform, transform_description: Dict[str, Any], cache_dir: str, *,
                     views: int = 1, seed: int = 0, temporal_pool: str = "mean", batch_size: int = 64,
                     num_workers: int = 0, device: Optional[str] = None, progress: bool = True,
                     desc: str = "features", layers: Optional[Sequence[int]] = None,
                     norm_layers: bool = False, dtype: str = "float16") -> FeatureStore:
    """Extract (or reuse, or resume) the encoder's tokens for every view of every sample of `dataset`.

    Args:
        encoder: a `zoo.probes.FrozenEncoder` (anything with `fingerprint()`, `num_prefix_tokens` and a call
            mapping images `(B, C, H, W)` to tokens `(B, N, D)`).
        dataset: an `ImageFolderDataset`, `VideoFolderDataset` or `ArrayDataset` (`load`, `targets`, `classes`,
            `fingerprint`).
        transform: the per-image transform; `transform_description` is what keys it.
        cache_dir: the cache root; the store goes to `<cache_dir>/<key>`.
        views: views per sample (several for cached augmentations; each seeded by (seed, sample, view)).
        seed: the augmentation seed (part of the key when views are random).
        temporal_pool: for videos, "mean" or "concat" of per-frame tokens over time.
        batch_size, num_workers: extraction batches and DataLoader workers.
        device: where the encoder runs (None: where its parameters are).
        layers: block indices (negative: from the end) whose tokens to store, all from one pass of the encoder
            (`encoder.forward_layers`); None stores the final output (`encoder(images)`).
        norm_layers: apply the encoder's final norm to the chosen layers' tokens.
        dtype: "float16" (half the bytes) or "float32" (for encoders whose tokens reach past float16's 65504:
            a float16 store refuses them rather than caching inf).

    Returns:
        The finished `FeatureStore`.
    """
    if temporal_pool not in TEMPORAL_POOLS:
        raise ValueError(f"temporal_pool must be one of {TEMPORAL_POOLS}, got {temporal_pool!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if layers is None and norm_layers:
        raise ValueError("norm_layers=True needs layers (it normalises the chosen blocks' tokens)")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    blocks = None if layers is None else encoder.resolve_layers(layers)
    is_video = getattr(dataset, "kind", "") == "video_folder"
    description = {
        "format": FORMAT_VERSION,
        "encoder": encoder.fingerprint(),
        "data": dataset.fingerprint(),
        "transform": transform_description,
        "views": views,
        "seed": seed if transform_description.get("is_training") else None,
        "temporal_pool": temporal_pool if is_video else None,
        "dtype": dtype,
    }
    if blocks is not None:  # only then: the final-output stores keep the keys they always had
        description.update(layers=list(blocks), norm_layers=bool(norm_layers))
    key = cache_key(description)
    path = os.path.join(os.fspath(cache_dir), key)
    meta_path = os.path.join(path, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("complete"):
                return FeatureStore.open(path)
    os.makedirs(path, exist_ok=True)

    views_ds = ViewDataset(dataset, transform, views=views, seed=seed)
    total = len(views_ds)
    num_chunks = (total + batch_size - 1) // batch_size
    done_path = os.path.join(path, "done.npy")
    feat_paths = [os.path.join(path, name) for name in _feature_files(blocks)]
    meta = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    if meta is not None and (meta["batch_size"] != batch_size or not all(map(os.path.isfile, feat_paths))):
        meta = None  # a different chunking: start over
    if meta is None:
        done = np.lib.format.open_memmap(done_path, mode="w+", dtype=np.bool_, shape=(num_chunks,))
        done[:] = False
        done.flush()
        np.save(os.path.join(path, "labels.npy"), np.asarray(dataset.targets, dtype=np.int64))
        feats = None
    else:
        done = np.load(done_path, mmap_mode="r+")
        feats = [np.load(fp, mmap_mode="r+") for fp in feat_paths]

    if device is None:
        params = list(encoder.parameters())
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    encoder.to(device)
    pending = [c for c in range(num_chunks) if not done[c]]
    batches = [list(range(c * batch_size, min(total, (c + 1) * batch_size))) for c in pending]
    loader = DataLoader(views_ds, batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    p = stored_prefix_tokens(encoder, blocks is not None)

    def encode(images):  # one tensor (B, N_l, D_l) per stored layer
        return [encoder(images)] if blocks is None else encoder.forward_layers(images, blocks, norm=norm_layers)

    start = time.perf_counter()
    bar = tqdm(total=num_chunks, initial=num_chunks - len(pending), desc=desc, disable=not progress, leave=False)
    for chunk, (x, _) in zip(pending, loader):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if is_video:
                B, T = x.shape[:2]
                tokens = [pool_time(t.reshape(B, T, *t.shape[1:]).float(), p, temporal_pool)
                          for t in encode(x.flatten(0, 1))]  # per frame (B·T, N, D) -> per clip
            else:
                tokens = encode(x)  # [(B, N, D)]
        outs = [t.float().cpu().numpy() for t in tokens]
        if dtype == "float16":
            peak = max(float(np.abs(o[np.isfinite(o)]).max(initial=0.0)) for o in outs)
            if peak > np.finfo(np.float16).max:
                raise ValueError(f"the encoder's tokens reach {peak:.4g}, past float16's 65504: extract with "
                                 f"dtype='float32' (cache.dtype: float32 in a probing config)")
            outs = [o.astype(np.float16) for o in outs]
        if feats is None:  # the token shapes are known after the first batch
            feats = [np.lib.format.open_memmap(fp, mode="w+", dtype=dtype,
                                               shape=(len(dataset), views, *out.shape[1:]))
                     for fp, out in zip(feat_paths, outs)]
            num_prefix = p * (dataset.num_frames if is_video and temporal_pool == "concat" else 1)
            meta = {"key": key, "description": description, "batch_size": batch_size, "complete": False,
                    "num_prefix_tokens": num_prefix, "classes": list(dataset.classes),
                    "shape": list(feats[0].shape)}
            if blocks is not None:
                meta.update(layers=list(blocks), num_encoder_layers=int(encoder.num_layers),
                            shapes=[list(f.shape) for f in feats])
            _write_json(meta_path, meta)
        lo = chunk * batch_size
        for f, out in zip(feats, outs):
            flat = f.reshape(len(dataset) * views, *f.shape[2:])  # a view of the memmap: row i·V + v
            flat[lo:lo + len(out)] = out
            f.flush()
        done[chunk] = True
        done.flush()
        bar.update(1)
    bar.close()
    del loader
    if not bool(np.all(done)):
        raise RuntimeError(f"feature extraction into {path!r} stopped before the end; call again to resume")
    meta["complete"] = True
    meta["extract_seconds"] = meta.get("extract_seconds", 0.0) + time.perf_counter() - start
    _write_json(meta_path, meta)
    return FeatureStore.open(path)

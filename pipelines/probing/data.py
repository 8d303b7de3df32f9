"""Labelled data for probing: image folders, video folders (frames sampled uniformly with decord) and in-memory
arrays, plus the transforms (timm's) and the seeded augmented views that the feature cache stores.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import Dataset

__all__ = [
    "ImageFolderDataset", "VideoFolderDataset", "ArrayDataset", "ViewDataset", "build_transform",
    "uniform_frame_indices", "stratified_split", "digits_dataset", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _scan_folder(root: str, extensions: Sequence[str], classes: Optional[Sequence[str]] = None):
    if not os.path.isdir(root):
        raise ValueError(f"root must be a folder with one sub-folder per class, got {root!r}")
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"root {root!r} has no class sub-folders")
    samples = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(tuple(extensions)):
                    rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                    samples.append((rel, label))
    if not samples:
        raise ValueError(f"no files with extensions {tuple(extensions)} under {root!r}")
    return list(classes), samples


def _read_split_file(split_file: str) -> List[str]:
    if not os.path.isfile(split_file):
        raise ValueError(f"split_file must be a text file of relative paths, one a line, got {split_file!r}")
    with open(split_file) as f:
        return [ln.strip().replace("\\", "/") for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


class _FolderDataset(Dataset):
    extensions: Tuple[str, ...] = ()
    kind = "folder"

    def __init__(self, root: str, split_file: Optional[str] = None, classes: Optional[Sequence[str]] = None):
        self.root = os.path.abspath(os.fspath(root))
        self.classes, samples = _scan_folder(self.root, self.extensions, classes)
        if split_file is not None:
            wanted = _read_split_file(os.fspath(split_file))
            index = {rel: label for rel, label in samples}
            missing = [w for w in wanted if w not in index]
            if missing:
                raise ValueError(f"split_file {split_file!r} lists files not under {self.root!r} "
                                 f"(relative to it): {missing[:5]}")
            samples = [(w, index[w]) for w in wanted]
        self.samples = samples

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, indices: Sequence[int]):
        """A copy holding only the samples at `indices`."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.samples = [self.samples[i] for i in indices]
        return out

    def fingerprint(self) -> Dict[str, Any]:
        files = []
        for rel, label in self.samples:
            st = os.stat(os.path.join(self.root, rel))
            files.append((rel, label, st.st_size, st.st_mtime_ns))
        return {"kind": self.kind, "root": self.root, "classes": self.classes, "files": _digest(files),
                **self._extra_fingerprint()}

    def _extra_fingerprint(self) -> Dict[str, Any]:
        return {}


class ImageFolderDataset(_FolderDataset):
    """Images in ImageFolder layout (`root/<class>/**/<image>`), optionally restricted by a split file.

    Args:
        root: the folder; class names are its sub-folders, sorted, unless `classes` is given.
        split_file: optional text file of paths relative to `root`, one a line (`cat/001.jpg`).
        classes: the class list (to keep train and validation labels aligned).
    """

    extensions = IMAGE_EXTENSIONS
    kind = "image_folder"

    def load(self, index: int):
        rel, label = self.samples[index]
        with Image.open(os.path.join(self.root, rel)) as img:
            return img.convert("RGB"), label


def uniform_frame_indices(num_video_frames: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread uniformly over a video: the centres of `num_frames` equal segments."""
    if num_video_frames < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_video_frames=} {num_frames=}")
    return np.minimum(((np.arange(num_frames) + 0.5) * num_video_frames / num_frames).astype(np.int64),
                      num_video_frames - 1)


class VideoFolderDataset(_FolderDataset):
    """Videos, one folder per class (`root/<class>/<video>`); `num_frames` frames sampled uniformly with decord.

    Args:
        root: the folder; class names are its sub-folders.
        num_frames: frames per clip, at the centres of equal segments of the video.
        split_file: optional text file of paths relative to `root`.
        classes: the class list.
    """

    extensions = VIDEO_EXTENSIONS
    kind = "video_folder"

    def __init__(self, root: str, num_frames: int = 8, split_file: Optional[str] = None,
                 classes: Optional[Sequence[str]] = None):
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        super().__init__(root, split_file, classes)
        self.num_frames = num_frames

    def _extra_fingerprint(self):
        return {"num_frames": self.num_frames, "sampling": "uniform-centres"}

    def load(self, index: int):
        import decord

        rel, label = self.samples[index]
        reader = decord.VideoReader(os.path.join(self.root, rel), num_threads=1)
        idx = uniform_frame_indices(len(reader), self.num_frames)
        frames = reader.get_batch(list(idx)).asnumpy()  # (T, H, W, 3) uint8
        return [Image.fromarray(f) for f in frames], label


class ArrayDataset(Dataset):
    """Images held in memory: `images` `(N, H, W)` or `(N, H, W, C)` (C in 1, 3), uint8 or floats in [0, 1].

    Args:
        images: the array (numpy or torch).
        labels: `(N,)` integer class ids.
        classes: optional class names (default: "0", "1", ...).
        name: a label for the data in cache descriptions.
    """

    kind = "arrays"

    def __init__(self, images, labels, classes: Optional[Sequence[str]] = None, name: str = "arrays"):
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(f"images must be (N, H, W) or (N, H, W, C) with C in (1, 3), got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be (N,)={len(images)} integers, got {labels.shape} {labels.dtype}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise TypeError(f"images must be uint8 or float, got {images.dtype}")
            images = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes = list(classes) if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]
        self.name = name

    @property
    def targets(self) -> List[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int]):
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], self.classes, self.name)

    def fingerprint(self) -> Dict[str, Any]:
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.tobytes())
        return {"kind": self.kind, "name": self.name, "shape": list(self.images.shape), "sha256": h.hexdigest()}

    def load(self, index: int):
        img = self.images[index]
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        return Image.fromarray(img).convert("RGB"), int(self.labels[index])


def digits_dataset() -> ArrayDataset:
    """scikit-learn's digits (1,797 8×8 grey images, 10 classes), shipped with the package."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return ArrayDataset((d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target, name="sklearn_digits")


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0):
    """Train and validation indices, stratified by label and fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    idx = np.arange(len(labels))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=np.asarray(labels))
    return sorted(tr.tolist()), sorted(va.tolist())


def build_transform(data_config: Dict[str, Any], train: bool = False,
                    augment: Optional[Dict[str, Any]] = None) -> Tuple[Callable, Dict[str, Any]]:
    """timm's transform for an encoder's `data_config`, and the description that keys the feature cache.

    Args:
        data_config: `input_size`, `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`.
        train: training augmentation (random resized crop, flip, ...) instead of the evaluation resize+crop.
        augment: extra `timm.data.create_transform` arguments for training (`scale`, `hflip`, `color_jitter`,
            `auto_augment`, ...).
    """
    augment = dict(augment or {})
    kwargs = dict(input_size=tuple(data_config["input_size"]), interpolation=data_config.get("interpolation",
                  "bicubic"), mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))
    if train:
        kwargs.update(dict(color_jitter=0.0, hflip=0.5))
        kwargs.update(augment)
    else:
        if augment:
            raise ValueError(f"augment only applies with train=True, got {augment!r}")
        kwargs.update(crop_pct=data_config.get("crop_pct"), crop_mode=data_config.get("crop_mode"))
    transform = create_transform(is_training=train, **kwargs)
    return transform, {"is_training": train, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}}


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python's and torch's RNGs (timm's transforms use both) and restore them afterwards."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


class ViewDataset(Dataset):
    """`views` transformed views of each sample of `base`; item `i·views + v` is view v of sample i.

    The transform's randomness is seeded per (seed, sample, view), so a view is the same every time it is
    made (the cache can resume and be re-made exactly); the frames of a clip share one draw.

    Returns `(x, label)` with x `(C, H, W)` for images or `(T, C, H, W)` for videos.
    """

    def __init__(self, base, transform: Callable, views: int = 1, seed: int = 0):
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a positive int, got {views!r}")
        self.base, self.transform, self.views, self.seed = base, transform, views, seed

    def __len__(self) -> int:
        return len(self.base) * self.views

    def __getitem__(self, item: int):
        index, view = divmod(item, self.views)
        raw, label = self.base.load(index)
        seed = (self.seed * 1_000_003 + index * 9_973 + view) % (2 ** 63)
        if isinstance(raw, list):
            frames = []
            for frame in raw:
                with _seeded(seed):
                    frames.append(self.transform(frame))
            return torch.stack(frames), label
        with _seeded(seed):
            return self.transform(raw), label

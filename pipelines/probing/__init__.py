"""Probe training on frozen encoders: data (image/video folders, arrays) → cached features → probe grid."""
from .cache import FeatureStore, cache_key, extract_features, pool_time
from .data import (
    ArrayDataset,
    ImageFolderDataset,
    VideoFolderDataset,
    ViewDataset,
    build_transform,
    digits_dataset,
    stratified_split,
    uniform_frame_indices,
)
from .run import DEFAULT_CONFIG, apply_overrides, load_config, merge_config, run_probe
from .trainer import ProbeSpec, TrainConfig, results_table, save_curves, topk_correct, train_probes

__all__ = [
    "run_probe", "load_config", "merge_config", "apply_overrides", "DEFAULT_CONFIG",
    "FeatureStore", "cache_key", "extract_features", "pool_time",
    "ArrayDataset", "ImageFolderDataset", "VideoFolderDataset", "ViewDataset", "build_transform",
    "digits_dataset", "stratified_split", "uniform_frame_indices",
    "ProbeSpec", "TrainConfig", "train_probes", "results_table", "save_curves", "topk_correct",
]

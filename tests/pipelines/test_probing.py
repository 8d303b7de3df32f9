"""Probe training: datasets (image/video folders, arrays), the feature cache, the trainer and `zoo probe`."""
import functools
import glob
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipelines.probing import (
    ArrayDataset,
    FeatureStore,
    ImageFolderDataset,
    ProbeSpec,
    TrainConfig,
    VideoFolderDataset,
    ViewDataset,
    build_transform,
    extract_features,
    pool_time,
    results_table,
    run_probe,
    topk_correct,
    train_probes,
    uniform_frame_indices,
)
from pipelines.probing.run import apply_overrides, merge_config, DEFAULT_CONFIG
from zoo.probes import create_encoder

# ---------------------------------------------------------------------------------------------------------- helpers


def _digits_folder(root, per_class=None, size=16):
    """scikit-learn's digits written as PNGs in ImageFolder layout (`root/<digit>/<i>.png`)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    counts = {}
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        arr = (img * 255.0 / 16.0).astype(np.uint8)
        Image.fromarray(arr).resize((size, size), Image.NEAREST).save(folder / f"{i:04d}.png")
    return root


def _sample_images_folder(root):
    """Three scikit-image sample images, two crops each, as a 3-class image folder."""
    from skimage import data

    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)()
        (root / name).mkdir(parents=True)
        for j, (y, x) in enumerate(((0, 0), (40, 60))):
            Image.fromarray(img[y:y + 96, x:x + 128]).save(root / name / f"{j}.jpg")
    return root


def _write_video(path, frames):
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=8, codec="libx264", macro_block_size=1,
                            ffmpeg_params=["-crf", "0", "-preset", "ultrafast"]) as w:  # lossless
        for f in frames:
            w.append_data(f)


class _Counting:
    """Counts (and optionally interrupts) calls into an encoder's model."""

    def __init__(self, encoder, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        self._inner = encoder.model.forward_features
        encoder.model.forward_features = self

    def __call__(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self._inner(x)


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("timm:test_vit", img_size=32)


# ---------------------------------------------------------------------------------------------------------- data


def test_image_folder_dataset_and_split_file(tmp_path):
    root = _sample_images_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["astronaut", "chelsea", "coffee"] and len(ds) == 6
    assert ds.targets == [0, 0, 1, 1, 2, 2]
    img, label = ds.load(2)
    assert img.mode == "RGB" and img.size == (128, 96) and label == 1
    split = tmp_path / "val.txt"
    split.write_text("coffee/1.jpg\nastronaut/0.jpg\n")
    val = ImageFolderDataset(root, split_file=str(split))
    assert [s for s in val.samples] == [("coffee/1.jpg", 2), ("astronaut/0.jpg", 0)]
    split.write_text("coffee/9.jpg\n")
    with pytest.raises(ValueError, match="split_file"):
        ImageFolderDataset(root, split_file=str(split))
    with pytest.raises(ValueError, match="root"):
        ImageFolderDataset(tmp_path / "missing")
    tf, desc = build_transform({"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"})
    x, y = ViewDataset(ds, tf)[3]
    expected = (np.asarray(ds.load(3)[0].resize((43, 32), Image.BILINEAR), dtype=np.float32) / 255.0 - 0.5) / 0.5
    assert x.shape == (3, 32, 32) and y == 1 and desc["is_training"] is False
    assert abs(float(x.mean()) - float(expected[:, 5:37].mean())) < 0.05


def test_video_folder_dataset_samples_frames_uniformly(tmp_path):
    assert uniform_frame_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert uniform_frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng()
    levels = rng.permutation(np.linspace(20, 235, 12).astype(np.uint8))  # frame t has grey level levels[t]
    for cls in ("a", "b"):
        (tmp_path / "vids" / cls).mkdir(parents=True)
        _write_video(tmp_path / "vids" / cls / "clip.mp4",
                     [np.full((32, 64, 3), lv if cls == "a" else 255 - lv, np.uint8) for lv in levels])
    ds = VideoFolderDataset(tmp_path / "vids", num_frames=4)
    assert ds.classes == ["a", "b"] and len(ds) == 2
    frames, label = ds.load(0)
    assert len(frames) == 4 and label == 0 and frames[0].size == (64, 32)
    want = levels[uniform_frame_indices(12, 4)].astype(float)
    got = np.array([np.asarray(f, dtype=float).mean() for f in frames])
    np.testing.assert_allclose(got, want, atol=3)
    with pytest.raises(ValueError, match="num_frames"):
        VideoFolderDataset(tmp_path / "vids", num_frames=0)


def test_video_features_pooled_or_concatenated_over_time(tmp_path, encoder):
    rng = np.random.default_rng()
    (tmp_path / "v" / "x").mkdir(parents=True)
    _write_video(tmp_path / "v" / "x" / "0.mp4", [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                                                  for _ in range(6)])
    ds = VideoFolderDataset(tmp_path / "v", num_frames=3)
    tf, desc = build_transform(encoder.data_config)
    clip, _ = ViewDataset(ds, tf)[0]
    assert clip.shape == (3, 3, 32, 32)
    per_frame = encoder(clip)  # (T, N, D)
    mean = extract_features(encoder, ds, tf, desc, tmp_path / "c", temporal_pool="mean", progress=False)
    cat = extract_features(encoder, ds, tf, desc, tmp_path / "c", temporal_pool="concat", progress=False)
    assert mean.path != cat.path
    torch.testing.assert_close(torch.from_numpy(np.array(mean.features[0, 0])).float(),
                               per_frame.mean(0), atol=2e-3, rtol=2e-3)
    expected_cat = torch.cat([per_frame[:, :1].flatten(0, 1), per_frame[:, 1:].flatten(0, 1)])
    torch.testing.assert_close(torch.from_numpy(np.array(cat.features[0, 0])).float(), expected_cat,
                               atol=2e-3, rtol=2e-3)
    assert mean.num_prefix_tokens == 1 and cat.num_prefix_tokens == 3
    with pytest.raises(ValueError, match="temporal_pool"):
        pool_time(per_frame[None], 1, "max")


def test_array_dataset_validation():
    imgs = np.random.rand(5, 8, 8)
    ds = ArrayDataset(imgs, np.array([0, 1, 0, 1, 2]))
    assert ds.classes == ["0", "1", "2"] and ds.load(1)[0].size == (8, 8)
    assert ds.select([1, 3]).targets == [1, 1]
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(imgs, np.array([0, 1]))
    with pytest.raises(ValueError, match="images"):
        ArrayDataset(np.zeros((5, 8, 8, 2)), np.arange(5))


# ---------------------------------------------------------------------------------------------------------- cache


def test_float16_store_refuses_tokens_past_its_range(tmp_path, encoder):
    """Tokens past float16's 65504 are refused by a float16 store (not cached as inf); a float32 store keeps them
    exactly, under its own key."""
    ds = ArrayDataset(np.random.randint(0, 255, (6, 12, 12, 3), dtype=np.uint8), np.arange(6) % 2)
    tf, desc = build_transform(encoder.data_config)
    inner = encoder.model.forward_features
    encoder.model.forward_features = lambda x: inner(x) * 1e5
    try:
        with pytest.raises(ValueError, match="float32"):
            extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, progress=False)
        store = extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, progress=False, dtype="float32")
        assert store.features.dtype == np.float32 and np.isfinite(np.array(store.features)).all()
        x = torch.stack([ViewDataset(ds, tf)[i][0] for i in range(6)])
        with torch.no_grad():
            ref = inner(x) * 1e5
        torch.testing.assert_close(torch.from_numpy(np.array(store.features[:, 0])), ref, rtol=1e-5, atol=1e-2)
        with pytest.raises(ValueError, match="dtype"):
            extract_features(encoder, ds, tf, desc, tmp_path, progress=False, dtype="bfloat16")
    finally:
        encoder.model.forward_features = inner


def test_cache_written_once_reused_and_keyed(tmp_path, encoder):
    ds = ArrayDataset(np.random.randint(0, 255, (10, 12, 12, 3), dtype=np.uint8), np.arange(10) % 3)
    tf, desc = build_transform(encoder.data_config)
    counter = _Counting(encoder)
    try:
        store = extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, progress=False)
        assert counter.calls == 3  # ceil(10 / 4) batches
        assert store.features.shape == (10, 1, 5, 64) and store.features.dtype == np.float16
        assert isinstance(store.features, np.memmap)
        np.testing.assert_array_equal(store.labels, np.arange(10) % 3)
        x = torch.stack([ViewDataset(ds, tf)[i][0] for i in range(10)])
        with torch.no_grad():
            ref = counter._inner(x)  # the model itself, not counted
        torch.testing.assert_close(torch.from_numpy(np.array(store.features[:, 0])).float(), ref,
                                   atol=2e-3, rtol=2e-3)
        again = extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, progress=False)
        assert counter.calls == 3 and again.path == store.path  # reused, no encoder call
        # a different transform, different data or more views: a different store
        tf2, desc2 = build_transform({**encoder.data_config, "mean": (0.4, 0.4, 0.4)})
        other = extract_features(encoder, ds, tf2, desc2, tmp_path, batch_size=4, progress=False)
        assert other.path != store.path and counter.calls == 6
        assert not np.array_equal(np.array(other.features), np.array(store.features))
        ds2 = ArrayDataset(ds.images[::-1].copy(), ds.labels)
        assert extract_features(encoder, ds2, tf, desc, tmp_path, batch_size=4, progress=False).path != store.path
    finally:
        encoder.model.forward_features = counter._inner


def test_cache_resumes_after_interruption(tmp_path, encoder):
    ds = ArrayDataset(np.random.randint(0, 255, (11, 12, 12, 3), dtype=np.uint8), np.arange(11) % 2)
    tf, desc = build_transform(encoder.data_config)
    counter = _Counting(encoder, fail_after=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_features(encoder, ds, tf, desc, tmp_path, batch_size=3, progress=False)
        assert counter.calls == 2
        (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        meta = json.loads((path / "meta.json").read_text())
        assert meta["complete"] is False
        assert np.load(path / "done.npy").tolist() == [True, True, False, False]
        with pytest.raises(ValueError, match="incomplete"):
            FeatureStore.open(str(path))
        counter.fail_after = None
        store = extract_features(encoder, ds, tf, desc, tmp_path, batch_size=3, progress=False)
        assert counter.calls == 4  # only the two missing chunks were computed
        x = torch.stack([ViewDataset(ds, tf)[i][0] for i in range(11)])
        with torch.no_grad():
            ref = counter._inner(x)
        torch.testing.assert_close(torch.from_numpy(np.array(store.features[:, 0])).float(), ref,
                                   atol=2e-3, rtol=2e-3)
    finally:
        encoder.model.forward_features = counter._inner


def test_cache_augmented_views_are_seeded(tmp_path, encoder):
    ds = ArrayDataset(np.random.randint(0, 255, (4, 40, 40, 3), dtype=np.uint8), np.arange(4) % 2)
    tf, desc = build_transform(encoder.data_config, train=True, augment={"scale": (0.2, 0.5)})
    store = extract_features(encoder, ds, tf, desc, tmp_path, views=3, seed=1, progress=False)
    assert store.features.shape[:2] == (4, 3) and store.views == 3
    feats = np.array(store.features, dtype=np.float32)
    assert np.abs(feats[:, 0] - feats[:, 1]).max() > 1e-2  # the views differ
    views = ViewDataset(ds, tf, views=3, seed=1)
    torch.testing.assert_close(views[5][0], views[5][0])  # a view is reproducible
    again = extract_features(encoder, ds, tf, desc, tmp_path, views=3, seed=2, progress=False)
    assert again.path != store.path  # the augmentation seed is part of the key


class _CountingLayers:
    """Counts (and optionally interrupts) calls into a model's forward_intermediates."""

    def __init__(self, model, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after
        self.model = model
        self._inner = model.forward_intermediates
        model.forward_intermediates = self

    def __call__(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self._inner(*args, **kwargs)

    def restore(self):
        del self.model.forward_intermediates  # the class's method again


def test_layer_cache_one_pass_keyed_resumable(tmp_path, encoder):
    ds = ArrayDataset(np.random.randint(0, 255, (10, 12, 12, 3), dtype=np.uint8), np.arange(10) % 3)
    tf, desc = build_transform(encoder.data_config)
    layers_counter = _CountingLayers(encoder.model, fail_after=2)
    final_counter = _Counting(encoder)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, layers=[-1, -3], progress=False)
        layers_counter.fail_after = None
        store = extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, layers=[-1, -3], progress=False)
        assert layers_counter.calls == 3 and final_counter.calls == 0  # both blocks from one pass, resumed once
        assert store.layers == (5, 3) and [a.shape for a in store.arrays] == [(10, 1, 5, 64)] * 2
        x = torch.stack([ViewDataset(ds, tf)[i][0] for i in range(10)])
        with torch.no_grad():
            inter = layers_counter._inner(x, indices=[3, 5], return_prefix_tokens=True, output_fmt="NLC",
                                          intermediates_only=True)
        for block, (spatial, prefix) in zip((3, 5), inter):
            for layer in (block, block - 6):
                torch.testing.assert_close(torch.from_numpy(np.array(store.layer_features(layer)[:, 0])).float(),
                                           torch.cat([prefix, spatial], 1), atol=2e-3, rtol=2e-3)
        with pytest.raises(ValueError, match="layer"):
            store.layer_features(-2)  # block 4 was not stored
        with pytest.raises(ValueError, match="layer"):
            store.layer_features(None)  # two layers: say which
        again = extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, layers=[5, 3], progress=False)
        assert again.path == store.path and layers_counter.calls == 3  # keyed by the blocks: reused
        paths = {extract_features(encoder, ds, tf, desc, tmp_path, batch_size=4, progress=False, **kw).path
                 for kw in ({"layers": [-3, -1]}, {"layers": [-1]}, {"layers": [-1, -3], "norm_layers": True}, {})}
        assert store.path not in paths and len(paths) == 4
        with pytest.raises(ValueError, match="norm_layers"):
            extract_features(encoder, ds, tf, desc, tmp_path, norm_layers=True, progress=False)
        with pytest.raises(ValueError, match="layers"):
            extract_features(encoder, ds, tf, desc, tmp_path, layers=[6], progress=False)
    finally:
        layers_counter.restore()
        encoder.model.forward_features = final_counter._inner


def test_final_output_cache_keeps_its_key(tmp_path, encoder):
    """Stores of the final output (no layers) keep the key they had before layers existed: old caches are reused."""
    imgs = (np.arange(4 * 8 * 8 * 3) * 7 % 256).astype(np.uint8).reshape(4, 8, 8, 3)
    tf, desc = build_transform(encoder.data_config)
    store = extract_features(encoder, ArrayDataset(imgs, np.array([0, 1, 0, 1])), tf, desc, tmp_path,
                             batch_size=4, progress=False)
    assert os.path.basename(store.path) == "fc8647c273ad3ae84c551ff7" and store.layers is None
    assert sorted(os.listdir(store.path)) == ["done.npy", "features.npy", "labels.npy", "meta.json"]


# ---------------------------------------------------------------------------------------------------------- trainer


def test_topk_correct_against_loop():
    logits, target = torch.randn(50, 7), torch.randint(0, 7, (50,))
    for k in (1, 3, 5, 9):
        ref = sum(int(target[i] in logits[i].argsort(descending=True)[:k]) for i in range(50))
        assert topk_correct(logits, target, (k,)) == [ref]


def _blob_store(root, n, seed, split, blocks=None):
    """A synthetic store whose class is set by which token carries a bump: attentive probes can find it.

    With `blocks=(signal, noise)`: a store of two blocks of a 6-block encoder, noise block first; only the signal
    block carries the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 1, 9, 16)).astype(np.float16)
    for i, c in enumerate(labels):
        x[i, 0, 1 + rng.integers(8), :] += np.float16(5.0) * np.eye(16, dtype=np.float16)[c]
    path = root / split
    path.mkdir()
    meta = {"complete": True, "num_prefix_tokens": 1, "classes": ["a", "b", "c", "d"]}
    if blocks is None:
        np.save(path / "features.npy", x)
    else:
        np.save(path / f"features_block{blocks[0]}.npy", x)
        np.save(path / f"features_block{blocks[1]}.npy", rng.normal(size=x.shape).astype(np.float16))
        meta.update(layers=[blocks[1], blocks[0]], num_encoder_layers=6)
    np.save(path / "labels.npy", labels.astype(np.int64))
    (path / "meta.json").write_text(json.dumps(meta))
    return FeatureStore.open(str(path))


def test_grid_trains_in_one_pass_and_resumes(tmp_path):
    train, val = _blob_store(tmp_path, 256, 0, "train"), _blob_store(tmp_path, 128, 1, "val")
    lr = 3e-2
    specs = [ProbeSpec("ep", "ep", lr, {"num_queries": 4}), ProbeSpec("aim", "aim", lr, {"num_heads": 2}),
             ProbeSpec("lin", "linear", lr, {"pool": "mean"})]
    cfg = TrainConfig(epochs=4, batch_size=32, warmup_epochs=1, eval_every=2, optimizer="adamw")
    out = tmp_path / "run"
    m1, probes = train_probes(specs, train, val, cfg, str(out), progress=False, return_probes=True)
    assert set(m1["runs"]) == {"ep", "aim", "lin"} and m1["resumed_from_epoch"] == 0
    assert m1["runs"]["ep"]["top1"] > 60 and m1["runs"]["aim"]["top1"] > 60  # chance is 25 %
    assert [h["epoch"] for h in m1["runs"]["ep"]["history"] if "val_top1" in h] == [2, 4]
    assert m1["runs"]["ep"]["params"] == 4 * 16 + 16 * 16 + 16 * 4 + 4
    # warm-up then cosine decay, per step: the lr after the last epoch is far below the peak
    assert m1["runs"]["ep"]["history"][-1]["lr"] < 0.1 * lr
    # resume of a finished run: nothing to train, the checkpoint's weights come back exactly
    m_same, restored = train_probes(specs, train, val, cfg, str(out), progress=False, return_probes=True)
    assert m_same["resumed_from_epoch"] == 4 and m_same["runs"]["ep"]["history"] == m1["runs"]["ep"]["history"]
    for name in probes:
        for (k, a), b in zip(probes[name].state_dict().items(), restored[name].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    # resume: a longer run picks up after epoch 4 with the same weights
    cfg_long = TrainConfig(epochs=6, batch_size=32, warmup_epochs=1, eval_every=2)
    m2 = train_probes(specs, train, val, cfg_long, str(out), progress=False)
    assert m2["resumed_from_epoch"] == 4 and len(m2["runs"]["ep"]["history"]) == 6
    assert m2["runs"]["ep"]["history"][:4] == m1["runs"]["ep"]["history"]
    # a different grid refuses the checkpoint, and so does a shorter run (it would report the longer one's results)
    with pytest.raises(ValueError, match="different probe grid"):
        train_probes(specs[:1], train, val, cfg, str(out), progress=False)
    with pytest.raises(ValueError, match="already trained 6 epochs, more than train.epochs=4"):
        train_probes(specs, train, val, cfg, str(out), progress=False)
    # LARS works too, and so does reading batches from the memmap instead of preloading: same numbers
    runs = [train_probes(specs[:1], train, val, TrainConfig(epochs=2, batch_size=32, optimizer="lars",
                                                            preload=preload), str(tmp_path / f"lars{preload}"),
                         progress=False)["runs"]["ep"] for preload in (True, False)]
    assert runs[0]["top1"] is not None
    losses = [[h["train_loss"] for h in r["history"]] for r in runs]
    assert losses[0] == pytest.approx(losses[1])


def test_grid_trains_with_a_remainder_of_one_and_probe_init_ignores_grid_order(tmp_path):
    """129 rows at batch 32: the single leftover row joins the last batch (BatchNorm cannot normalise one row);
    a probe's initial weights depend on the seed and its name only, not on the probes before it in the grid."""
    from pipelines.probing import trainer

    assert trainer._batch_bounds(129, 32) == [(0, 32), (32, 64), (64, 96), (96, 129)]
    assert trainer._batch_bounds(130, 32)[-1] == (128, 130) and trainer._batch_bounds(1, 32) == [(0, 1)]
    train, val = _blob_store(tmp_path, 129, 0, "train"), _blob_store(tmp_path, 64, 1, "val")
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adamw")
    ep = ProbeSpec("ep", "ep", 1e-2, {"num_queries": 4})
    aim = ProbeSpec("aim", "aim", 1e-2, {"num_heads": 2})
    alone = train_probes([ep], train, val, cfg, str(tmp_path / "a"), progress=False)["runs"]["ep"]
    second = train_probes([aim, ep], train, val, cfg, str(tmp_path / "b"), progress=False)["runs"]["ep"]
    assert len(alone["history"]) == 1 and alone["history"] == second["history"]


def test_grid_layers_axis_reads_each_batch_once(tmp_path, monkeypatch):
    from pipelines.probing import trainer

    train, val = (_blob_store(tmp_path, n, seed, split, blocks=(2, 5))
                  for n, seed, split in ((256, 0, "train"), (128, 1, "val")))
    specs = [ProbeSpec("ep_last", "ep", 3e-2, {"num_queries": 4}, layer=-1),
             ProbeSpec("ep_b2", "ep", 3e-2, {"num_queries": 4}, layer=2),
             ProbeSpec("lin_b2", "linear", 3e-2, {"pool": "mean"}, layer=-4)]
    reads = []
    batch = trainer._Features.batch
    monkeypatch.setattr(trainer._Features, "batch", lambda self, *a: reads.append(len(a[0])) or batch(self, *a))
    cfg = TrainConfig(epochs=4, batch_size=32, eval_every=2)
    metrics = train_probes(specs, train, val, cfg, str(tmp_path / "run"), progress=False)
    assert len(reads) == 4 * 8 + 2 * 4  # every train batch and every eval batch read once for all probes
    runs = metrics["runs"]
    assert runs["ep_b2"]["top1"] > 60 and runs["lin_b2"]["top1"] > 40  # the class is in block 2 (chance 25 %)
    assert runs["ep_last"]["top1"] < 45  # block 5 is noise: the probe really read the other layer
    assert [(runs[n]["layer"], runs[n]["block"]) for n in ("ep_last", "ep_b2", "lin_b2")] == [(-1, 5), (2, 2),
                                                                                              (-4, 2)]
    _, markdown = results_table(metrics)
    assert "| ep_last | ep | 5 (-1) |" in markdown and "| ep_b2 | ep | 2 |" in markdown
    for bad in (ProbeSpec("x", "ep", 1e-3, {"num_queries": 4}, layer=-2),  # block 4: not stored
                ProbeSpec("x", "ep", 1e-3, {"num_queries": 4})):  # two layers stored: say which
        with pytest.raises(ValueError, match="layer"):
            train_probes([bad], train, val, cfg, str(tmp_path / "bad"), progress=False)
    legacy = _blob_store(tmp_path, 16, 0, "legacy")
    with pytest.raises(ValueError, match="layer"):
        train_probes([ProbeSpec("x", "ep", 1e-3, {"num_queries": 4}, layer=-1)], legacy, legacy, cfg,
                     str(tmp_path / "bad2"), progress=False)


def test_trainer_bad_config(tmp_path):
    train = _blob_store(tmp_path, 16, 0, "train")
    with pytest.raises(ValueError, match="epochs"):
        train_probes([ProbeSpec("a", "ep", 1e-3, {"num_queries": 4})], train, train, TrainConfig(epochs=0),
                     str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="nope").check()
    with pytest.raises(ValueError, match="unique"):
        train_probes([ProbeSpec("a", "ep", 1e-3, {"num_queries": 4})] * 2, train, train, TrainConfig(),
                     str(tmp_path / "o"), progress=False)


def test_config_merge_and_overrides():
    cfg = apply_overrides({"train": {"epochs": 3}}, ["train.lr=[1e-3, 3e-3]", "encoder.name=timm:test_vit"])
    assert cfg == {"train": {"epochs": 3, "lr": [1e-3, 3e-3]}, "encoder": {"name": "timm:test_vit"}}
    merged = merge_config(DEFAULT_CONFIG, cfg)
    assert merged["train"]["lr"] == [1e-3, 3e-3] and merged["train"]["batch_size"] == 128
    with pytest.raises(ValueError, match="train.epoch"):
        merge_config(DEFAULT_CONFIG, {"train": {"epoch": 3}})
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(ValueError, match="encoder.name"):
        run_probe({"data": {"kind": "digits"}})
    with pytest.raises(ValueError, match="data.kind"):
        run_probe({"encoder": {"name": "timm:test_vit"}, "data": {"kind": "csv"}, "output_dir": "/tmp/x"})


# ---------------------------------------------------------------------------------------------------------- end to end


def test_zoo_probe_cli_end_to_end(tmp_path, capsys):
    from pipelines.cli import main

    root = _digits_folder(tmp_path / "digits", per_class=40)
    out, cache = tmp_path / "out", tmp_path / "cache"
    config = {
        "name": "digits_tiny",
        "encoder": {"name": "timm:test_vit", "kwargs": {"img_size": 32}},
        "data": {"kind": "image_folder", "root": str(root), "val_fraction": 0.3},
        "cache": {"dir": str(cache), "batch_size": 100},
        "probes": [{"type": "linear", "pool": "mean"}, {"type": "ep", "num_queries": 8}],
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "eval_every": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["probe", "--config", str(path), "--output-dir", str(out), "--quiet", "train.epochs=6"]) == 0
    assert "best" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 10 and metrics["num_train"] + metrics["num_val"] == 400
    assert metrics["encoder"] == "timm:test_vit" and metrics["config"]["train"]["epochs"] == 6
    for name in ("linear", "ep"):
        run = metrics["runs"][name]
        assert run["top1"] > 2 * metrics["chance_top1"], (name, run["top1"])  # learns well above chance (10 %)
        assert len(run["history"]) == 6
    assert (out / "checkpoint.safetensors").is_file() and (out / "curves.png").stat().st_size > 5000
    assert "| ep |" in (out / "results.md").read_text()
    with Image.open(out / "curves.png") as img:
        assert img.size[0] > 500
    stores = sorted(os.listdir(cache))
    assert len(stores) == 2  # train and val
    # resume with more epochs: the cache is reused, training continues from the checkpoint
    assert main(["probe", "--config", str(path), "--output-dir", str(out), "--quiet", "train.epochs=8"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from_epoch"] == 6 and len(resumed["runs"]["ep"]["history"]) == 8
    assert resumed["runs"]["ep"]["history"][:6] == metrics["runs"]["ep"]["history"]
    assert resumed["cache"]["seconds_this_run"] < 0.5 * max(metrics["cache"]["seconds_this_run"], 1e-3) + 0.5
    assert sorted(os.listdir(cache)) == stores


def test_layers_lr_probe_grid_end_to_end_one_extraction(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits
    from timm.models.vision_transformer import VisionTransformer

    calls = {"forward_intermediates": 0, "forward_features": 0}
    for method in calls:
        inner = getattr(VisionTransformer, method)

        @functools.wraps(inner)  # keeps the signature, which the encoder reads
        def counted(self, *args, _inner=inner, _name=method, **kwargs):
            calls[_name] += 1
            return _inner(self, *args, **kwargs)

        monkeypatch.setattr(VisionTransformer, method, counted)
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:12] for c in range(10)])  # 120 images
    config = {
        "name": "layers_grid", "progress": False, "output_dir": str(tmp_path / "out"),
        "encoder": {"name": "timm:test_vit", "kwargs": {"img_size": 32}, "layers": [-1, -2]},
        "data": {"kind": "arrays", "images": d.images[keep] / 16.0, "labels": d.target[keep], "val_fraction": 0.25},
        "cache": {"dir": str(tmp_path / "cache"), "batch_size": 64},
        "probes": [{"type": "linear", "pool": "cls"}, {"type": "ep", "num_queries": 4}],
        "train": {"epochs": 2, "batch_size": 32, "lr": [1e-3, 3e-3]},
    }
    metrics = run_probe(config)
    assert calls == {"forward_intermediates": 2 + 1, "forward_features": 0}  # one extraction: 90 train, 30 val
    expected = {f"{p}@L{layer}@lr{lr:g}" for p in ("linear", "ep") for layer in (-1, -2) for lr in (1e-3, 3e-3)}
    assert set(metrics["runs"]) == expected and metrics["cache"]["layers"] == [5, 4]
    for name, run in metrics["runs"].items():
        layer = -1 if "@L-1@" in name else -2
        assert (run["layer"], run["block"]) == (layer, 6 + layer) and len(run["history"]) == 2
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| layer |" in table and "| ep@L-2@lr0.003 | ep | 4 (-2) | 0.003 |" in table
    assert "| linear@L-1@lr0.001 | linear | 5 (-1) | 0.001 |" in table
    # the same layers again, or a sub-grid, reuse the cache: no encoder call
    config["output_dir"] = str(tmp_path / "out2")
    config["probes"] = [{"type": "ep", "num_queries": 4, "layers": [-2], "lr": 3e-3}]
    again = run_probe(config)
    assert calls["forward_intermediates"] == 3 and set(again["runs"]) == {"ep"} and again["runs"]["ep"]["block"] == 4
    bad_configs = ({"encoder": {"layers": -1}}, {"encoder": {"layers": [-1, 7]}},
                   {"probes": [{"type": "ep", "layers": [-3]}]}, {"encoder": {"layers": None, "norm_layers": True}})
    for bad in bad_configs:
        with pytest.raises(ValueError, match="layer"):
            run_probe(merge_config(config, bad))
    bad_probes = ({"type": "aim", "num_heads": 5}, {"type": "ep", "num_queries": 0}, {"type": "linear", "bogus": 1})
    for bad in bad_probes:  # a fresh cache dir: nothing to reuse, so only an early check avoids an extraction
        with pytest.raises(ValueError, match="probe"):
            run_probe(merge_config(config, {"probes": [bad], "cache": {"dir": str(tmp_path / "fresh")}}))
    assert calls["forward_intermediates"] == 3  # bad configs fail before any extraction


def test_example_config_parses_and_names_a_known_setup():
    here = os.path.dirname(__file__)
    cfg = yaml.safe_load(open(os.path.join(here, "..", "..", "configs", "probe", "digits_ep.yaml")))
    merged = merge_config(DEFAULT_CONFIG, cfg)
    assert merged["data"]["kind"] == "digits" and merged["encoder"]["name"].startswith("timm:")
    assert any(p["type"] == "ep" for p in merged["probes"])
    enc = merged["encoder"]
    assert len(enc["layers"]) >= 2  # it shows the layers axis, with blocks the encoder has
    assert len(set(create_encoder(enc["name"], **enc["kwargs"]).resolve_layers(enc["layers"]))) == len(enc["layers"])


def test_demo_probe_config_is_a_valid_layer_grid():
    from pipelines.demo import DEMO_STEPS
    from pipelines.probing.cli import DEMO_CONFIG
    from pipelines.probing.run import _grid

    assert [t for t, _ in DEMO_STEPS].count("probes") == 1
    cfg = merge_config(DEFAULT_CONFIG, DEMO_CONFIG)
    assert cfg["data"]["kind"] == "digits" and cfg["encoder"]["checkpoint"] is None  # offline
    specs = _grid(cfg["probes"], cfg["train"]["lr"], cfg["encoder"]["layers"])
    assert len({s.layer for s in specs}) >= 2 and len({s.lr for s in specs}) >= 2 and len({s.probe for s in specs}) >= 2
    enc = create_encoder(cfg["encoder"]["name"], **cfg["encoder"]["kwargs"])
    assert len(enc.resolve_layers(cfg["encoder"]["layers"])) == len({s.layer for s in specs})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                                                "probe", "*.yaml"))))
def test_shipped_configs_are_valid(path):
    """Every example config parses, uses only known keys, and expands into a probe grid."""
    from pipelines.probing.run import DEFAULT_CONFIG, _grid, load_config, merge_config

    cfg = merge_config(DEFAULT_CONFIG, load_config(path))
    assert cfg["encoder"]["name"] and cfg["data"]["kind"]
    lrs = cfg["train"]["lr"] if isinstance(cfg["train"]["lr"], list) else [cfg["train"]["lr"]]
    specs = _grid(cfg["probes"], lrs, cfg["encoder"]["layers"])
    assert len(specs) >= len(cfg["probes"])


def test_lars_adapts_matrices_without_weight_decay_and_schedule_is_maes():
    """EP's protocol uses MAE's LARS: every matrix step is trust_coeff x lr of its norm (weight decay 0 included);
    vectors take plain SGD steps. The schedule warms up linearly from 0 and then follows a half cosine."""
    from pipelines.probing.trainer import _create_optimizer, _Run

    cfg = TrainConfig(optimizer="lars", weight_decay=0.0, momentum=0.9, epochs=10, warmup_epochs=2)
    run = _Run(ProbeSpec("ep", "ep", 1.6, {"num_queries": 4}), 0, None, 32, 5, 1, cfg, 10, torch.device("cpu"))
    probe, opt = run.probe, run.optimizer
    mats = {id(p) for p in probe.parameters() if p.ndim > 1}
    assert all(g["always_adapt"] == all(id(p) in mats for p in g["params"]) for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    for g in opt.param_groups:
        g["lr"] = 1.6
    probe(torch.randn(6, 9, 32)).square().mean().backward()
    opt.step()
    for n, p in probe.named_parameters():
        if p.ndim > 1:
            assert ((p.detach() - before[n]).norm() / before[n].norm()).item() == pytest.approx(0.0016, rel=1e-3), n
    lrs = []
    for step in range(100):
        run.scheduler.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[20] == pytest.approx(1.6) and lrs[10] == pytest.approx(0.8)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # no drop at the end of warm-up, then decreasing
    assert lrs[60] == pytest.approx(0.8, rel=1e-6)  # half-way through the cosine
    adam = _create_optimizer(probe, TrainConfig(), 1e-3)
    assert type(adam).__name__ == "AdamW"

"""Train a classifier briefly on scikit-learn's digits: the zoo's offline sanity check that a model learns."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def load_digits_tensors(img_size: int, in_chans: int, test_fraction: float = 0.25, seed: int = 0):
    """Digits (1,797 8×8 images, 10 classes) upsampled to `img_size`, scaled to [0, 1] and normalised.

    Returns (x_train, y_train, x_test, y_test) with x of shape (N, in_chans, img_size, img_size); the split is
    stratified and fixed by `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if img_size < 8 or in_chans < 1:
        raise ValueError(f"img_size must be >= 8 and in_chans >= 1, got {img_size=} {in_chans=}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, in_chans, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@dataclass
class FitResult:
    accuracy: float
    seconds: float
    params: int
    final_loss: float


@torch.no_grad()
def evaluate_accuracy(model, x, y, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def fit_digits(model: torch.nn.Module, img_size: int, in_chans: int, epochs: int = 3, lr: float = 2e-3,
               batch_size: int = 64, seed: int = 0, progress: bool = True) -> FitResult:
    """Train `model` (10 classes) with AdamW + cosine decay on digits; report held-out accuracy."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    x_tr, y_tr, x_te, y_te = load_digits_tensors(img_size, in_chans, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    bar = tqdm(total=steps, desc=type(model).__name__, disable=not progress, leave=False)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = evaluate_accuracy(model, x_te, y_te)
    return FitResult(acc, time.perf_counter() - start, sum(p.numel() for p in model.parameters()), loss.item())

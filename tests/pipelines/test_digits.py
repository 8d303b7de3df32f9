"""`pipelines.digits`: the data loader, and that each model family learns digits briefly on one CPU thread."""
import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the zoo models)
from pipelines.digits import fit_digits, load_digits_tensors


def test_load_digits_tensors():
    x_tr, y_tr, x_te, y_te = load_digits_tensors(20, 3)
    assert x_tr.shape[1:] == (3, 20, 20) and x_te.shape[1:] == (3, 20, 20)
    assert len(x_tr) + len(x_te) == 1797 and len(x_tr) == len(y_tr) and len(x_te) == len(y_te)
    assert set(y_te.tolist()) == set(range(10))  # stratified split: every class is held out
    assert -1.0 <= x_tr.min() and x_tr.max() <= 1.0 and x_tr.std() > 0.1
    torch.testing.assert_close(x_tr[:, 0], x_tr[:, 2])  # grey digits copied over the channels
    with pytest.raises(ValueError, match="img_size"):
        load_digits_tensors(4, 1)
    with pytest.raises(ValueError, match="epochs"):
        fit_digits(torch.nn.Linear(1, 1), 8, 1, epochs=0)


# (model, img_size, in_chans, epochs, lr): one small model per family, as in pipelines.demo.DIGITS_MODELS.
FAMILIES = [
    ("minimal_vit_nomlp_wqk_mnist", 28, 1, 8, 4e-3),
    ("ninformer_small", 32, 3, 3, 3e-3),
    ("ulsam_mobilenetv1_tiny", 32, 3, 4, 1e-2),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,size,chans,epochs,lr", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_learns_digits(name, size, chans, epochs, lr):
    model = timm.create_model(name, num_classes=10)
    assert tuple(model.pretrained_cfg["input_size"]) == (chans, size, size)
    res = fit_digits(model, size, chans, epochs=epochs, lr=lr, progress=False)
    assert res.accuracy >= 0.5, f"{name}: held-out accuracy {res.accuracy:.3f} (chance 0.1)"
    assert res.params == sum(p.numel() for p in model.parameters())

"""zoo.layers.PatchEmbed against timm's PatchEmbed with dynamic_img_pad, on fresh random inputs."""
import pytest
import torch
from timm.layers import PatchEmbed as TimmPatchEmbed

from zoo.layers import PatchEmbed


@pytest.mark.parametrize("size", [(32, 48), (30, 45), (17, 16)])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_outputs_and_state_dict_match_timm(size, fmt):
    kw = dict(img_size=32, patch_size=(8, 16), in_chans=3, embed_dim=24, output_fmt=fmt, strict_img_size=False,
              dynamic_img_pad=True, norm_layer=torch.nn.LayerNorm if fmt == "NHWC" else None)
    ours, timm_pe = PatchEmbed(**kw), TimmPatchEmbed(**kw)
    timm_pe.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    ours, timm_pe = ours.double(), timm_pe.double()
    torch.testing.assert_close(ours(x), timm_pe(x), rtol=0, atol=0)
    assert ours.dynamic_feat_size(size) == timm_pe.dynamic_feat_size(size)


def test_whole_patches_are_not_copied(monkeypatch):
    """F.pad with zero padding copies the whole batch; inputs that are whole patches skip it."""
    calls = []
    real = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    pe = PatchEmbed(img_size=32, patch_size=8, embed_dim=16, strict_img_size=False, dynamic_img_pad=True)
    pe(torch.randn(1, 3, 32, 40))
    assert calls == []
    pe(torch.randn(1, 3, 30, 40))
    assert calls == [(0, 0, 0, 2)]

"""NiNformer (arXiv 2403.02411): the NiN block against an explicit float64 composition of the paper's equations."""
import pytest
import timm
import torch
import torch.nn.functional as F

from zoo.layers import MixerGatingUnit, NiNBlock
from zoo.models.ninformer import NiNformer

F64 = torch.float64


def _ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mlp(x, mlp):
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))  # exact GELU
    return h @ mlp.fc2.weight.T + mlp.fc2.bias


def _mgu_reference(x, mgu):
    """Linear(x) ⊙ MixerBlock(x), the Mixer with its token MLP over N and channel MLP over C, both residual."""
    m = mgu.mixer
    y = x + _mlp(_ln(x, m.norm1).transpose(1, 2), m.mlp_tokens).transpose(1, 2)
    y = y + _mlp(_ln(y, m.norm2), m.mlp_channels)
    return (x @ mgu.proj.weight.T + mgu.proj.bias) * y


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)  # LayerNorm affine too, so a mix-up of the norms shows


def test_block_matches_explicit_equations():
    blk = NiNBlock(12, 10, 20).to(F64).eval()
    _randomize(blk)
    x = torch.randn(3, 10, 12, dtype=F64)
    h = x + _mgu_reference(_ln(x, blk.norm), blk.mgu)
    ref = h + _mlp(_ln(h, blk.norm), blk.ffn)  # the same LayerNorm twice, as in the reference
    torch.testing.assert_close(blk(x), ref, atol=1e-12, rtol=0)


def test_gate_is_zero_when_projection_is_zero():
    mgu = MixerGatingUnit(16, 9, 24, 24).to(F64).eval()
    _randomize(mgu)
    x = torch.randn(2, 9, 16, dtype=F64)
    assert mgu(x).abs().max() > 1e-3  # a random gate is not zero
    with torch.no_grad():
        mgu.proj.weight.zero_()
        mgu.proj.bias.zero_()
    assert torch.equal(mgu(x), torch.zeros_like(x))
    # and the block then reduces to x + FFN(LN(x))
    blk = NiNBlock(16, 9, 24).to(F64).eval()
    _randomize(blk)
    with torch.no_grad():
        blk.mgu.proj.weight.zero_()
        blk.mgu.proj.bias.zero_()
    torch.testing.assert_close(blk(x), x + _mlp(_ln(x, blk.norm), blk.ffn), atol=1e-12, rtol=0)


def test_token_mixing_reaches_every_token():
    model = timm.create_model("test_ninformer").to(F64).eval()
    x = torch.randn(1, 3, 32, 32, dtype=F64)
    base = model.forward_features(x)
    assert base.shape == (1, 16, 32)
    j = int(torch.randint(0, 16, ()))
    x2 = x.clone()
    r, c = divmod(j, 4)
    x2[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += torch.randn(3, 8, 8, dtype=F64)  # perturb patch j only
    diff = (model.forward_features(x2) - base).abs().amax(-1)[0]  # (N,)
    assert (diff > 1e-9).all(), f"perturbing token {j} left tokens {torch.nonzero(diff <= 1e-9).flatten().tolist()}"
    # and a single block also mixes: token i != j changes
    blk = model.blocks[0]
    t = torch.randn(1, 16, 32, dtype=F64)
    t2 = t.clone()
    t2[0, j] += torch.randn(32, dtype=F64)  # not a constant shift: LayerNorm would remove that
    i = (j + 5) % 16
    assert (blk(t2)[0, i] - blk(t)[0, i]).abs().max() > 1e-9


def _reference_count(d, f, n, depth, patch, chans, classes):
    """The reference code's parameters: Conv patcher, per block LN + MGU(Mixer(2 LN, token FF, channel FF) +
    Linear) + FFN, and the classifier."""
    ff = lambda a, b: a * b + b + b * a + a  # noqa: E731  Linear(a, b) + Linear(b, a)
    block = 2 * d + (4 * d + ff(n, f) + ff(d, f) + d * d + d) + ff(d, f)
    return patch * patch * chans * d + d + depth * block + d * classes + classes


@pytest.mark.parametrize("name,d,f,depth", [("ninformer_cifar", 256, 512, 4), ("ninformer_small", 64, 128, 4),
                                            ("ninformer_large", 384, 768, 6), ("test_ninformer", 32, 64, 2)])
def test_parameter_counts(name, d, f, depth):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = (32 // model.patch_size) ** 2
    expected = _reference_count(d, f, n, depth, model.patch_size, 3, 10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_cifar_configuration():
    model = timm.create_model("ninformer_cifar")
    assert model.grid_size == (8, 8) and model.embed_dim == 256 and len(model.blocks) == 4
    assert model.blocks[0].mgu.mixer.mlp_tokens.fc1.weight.shape == (512, 64)
    assert model.blocks[0].ffn.drop1.p == 0.5


def test_model_forward_and_pooling():
    model = timm.create_model("test_ninformer").to(F64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    feats = model.forward_features(x)
    torch.testing.assert_close(model(x), feats.mean(1) @ model.head.weight.T + model.head.bias)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape for t in inter] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(inter[-1], feats.transpose(1, 2).reshape(2, 32, 4, 4))


def test_other_size_and_validation():
    model = timm.create_model("test_ninformer", img_size=48).eval()
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="in_chans=3 channels"):
        model(torch.randn(1, 1, 48, 48))
    with pytest.raises(ValueError, match="patch_size"):
        NiNformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="ffn_dim"):
        NiNBlock(8, 4, 0)

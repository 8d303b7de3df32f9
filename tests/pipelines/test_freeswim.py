"""FreeSwim (pipelines.freeswim) on tiny random Wan components, CPU, offline.

References are independent of the implementation: the window mask is the spec's deficit formula
(generators_lmm.md §1, `init_mask_flex`), self-attention is recomputed explicitly in float64 (RoPE as complex
rotation, the spec's mask, the temperature formula), and the cache is checked by counting `kernels.attention`
calls per step.
"""
import copy
import io
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from pipelines.freeswim.attention import (FreeSwimState, freeswim_attention_scale, freeswim_pattern,
                                          freeswim_processors, freeswim_window)

diffusers = pytest.importorskip("diffusers")

from pipelines.freeswim.pipeline import FreeSwimWanPipeline  # noqa: E402
from pipelines.freeswim.tiny import TINY_TEXT_DIM, tiny_wan_components  # noqa: E402


# ----------------------------------------------------------------------------- references

def spec_mask(T, H, W, d_h, d_w, inward=True):
    """The spec's visibility rule: key visible iff q_h-d_h-d_u <= k_h <= q_h+d_h+d_b (and the same on w)."""
    idx = torch.arange(T * H * W)
    h, w = (idx // W) % H, idx % W
    qh, qw, kh, kw = h[:, None], w[:, None], h[None, :], w[None, :]
    d_b, d_u = (d_h - qh).clamp(min=0), (d_h + qh - H + 1).clamp(min=0)
    d_r, d_l = (d_w - qw).clamp(min=0), (d_w + qw - W + 1).clamp(min=0)
    if not inward:
        d_b = d_u = d_r = d_l = torch.zeros_like(qh)
    return (kh <= qh + d_h + d_b) & (kh >= qh - d_h - d_u) & (kw <= qw + d_w + d_r) & (kw >= qw - d_w - d_l)


def explicit_self_attention(attn, x, freqs_cos, freqs_sin, mask, scale):
    """Wan self-attention written out in float64: projections, RMS norms, RoPE as a complex rotation, masked
    softmax with `scale`, output projection."""
    attn = copy.deepcopy(attn).double()
    x = x.double()
    q, k, v = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(x)), attn.to_v(x)
    B, L, _ = x.shape
    q, k, v = (t.view(B, L, attn.heads, -1) for t in (q, k, v))
    theta = torch.atan2(freqs_sin[..., 0::2], freqs_cos[..., 0::2]).double()  # (1, L, 1, D/2)
    rot = torch.polar(torch.ones_like(theta), theta)

    def rope(t):
        z = torch.view_as_complex(t.reshape(B, L, attn.heads, -1, 2).contiguous()) * rot
        return torch.view_as_real(z).flatten(-2)

    q, k = rope(q), rope(k)
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v).reshape(B, L, -1)
    return attn.to_out[0](out)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def components():
    return tiny_wan_components(seed=0)


@pytest.fixture
def pipe(components):
    p = FreeSwimWanPipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


def call_kwargs(**over):
    kw = dict(prompt="a red fox in the snow", height=64, width=64, base_height=32, base_width=32, num_frames=5,
              num_inference_steps=4, strength=0.5, guidance_scale=5.0, max_sequence_length=16, output_type="pt")
    kw.update(over)
    return kw


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- window pattern

@pytest.mark.parametrize("grid,base", [((2, 6, 8), (3, 5)), ((3, 7, 11), (4, 4)), ((1, 5, 9), (2, 6)),
                                       ((2, 9, 4), (5, 3))])
def test_window_mask_matches_spec(grid, base):
    T, H, W = grid
    d_h, d_w = base[0] // 2, base[1] // 2
    n = T * H * W
    mask = freeswim_pattern(grid, base).mask(n, n)
    ref = spec_mask(T, H, W, d_h, d_w)
    assert torch.equal(mask, ref)
    # every query keeps the training-scale field: T' (2 d_h + 1)(2 d_w + 1) keys (capped by the grid)
    expected = T * min(2 * d_h + 1, H) * min(2 * d_w + 1, W)
    assert (mask.sum(1) == expected).all()
    # border windows are shifted inward: the top row sees rows 0..2 d_h, the last row the last 2 d_h + 1 rows
    rows = torch.arange(n) // W % H
    assert set(rows[mask[0]].tolist()) == set(range(min(2 * d_h + 1, H)))
    last = (H - 1) * W
    assert set(rows[mask[last]].tolist()) == set(range(max(H - 2 * d_h - 1, 0), H))
    # interior queries: window centred on the query
    if H > 2 * d_h and W > 2 * d_w:
        qh, qw = d_h + (H - 2 * d_h - 1) // 2, d_w + (W - 2 * d_w - 1) // 2
        cols = torch.arange(n) % W
        q = qh * W + qw
        assert rows[mask[q]].min() == qh - d_h and rows[mask[q]].max() == qh + d_h
        assert cols[mask[q]].min() == qw - d_w and cols[mask[q]].max() == qw + d_w
    # the no-inward (clipped) ablation matches the spec with zero deficits and loses keys at the border
    # (clipped windows are centred, so all T' frames need a time window of 2 T' - 1)
    window = (2 * T - 1,) + freeswim_window(grid, base)[1:]
    clipped = kernels.Neighborhood(grid=grid, window=window, inward=False).mask(n, n)
    assert torch.equal(clipped, spec_mask(T, H, W, d_h, d_w, inward=False))
    if H > 2 * d_h + 1 or W > 2 * d_w + 1:
        assert clipped[0].sum() < mask[0].sum()


def test_window_covering_grid_is_full():
    grid = (2, 3, 4)
    n = 24
    assert freeswim_pattern(grid, (6, 8)).mask(n, n).all()
    assert spec_mask(2, 3, 4, 3, 4).all()


def test_pattern_and_scale_validate():
    with pytest.raises(ValueError, match="grid"):
        freeswim_pattern((4, 4), (2, 2))
    with pytest.raises(ValueError, match="base_tokens"):
        freeswim_attention_scale(64, 1, 10)
    with pytest.raises(ValueError, match="target_tokens"):
        freeswim_attention_scale(64, 100, 10)
    # the reference's constant and the training-resolution identity
    assert freeswim_attention_scale(128, 1560, 3120) == pytest.approx(math.sqrt(math.log(3120, 1560) / 128))
    assert freeswim_attention_scale(128) == freeswim_attention_scale(128, 1560, 3120)
    assert 128 ** 0.5 * freeswim_attention_scale(128) == pytest.approx(1.046, abs=5e-4)
    assert freeswim_attention_scale(128, 1560, 1560) == pytest.approx(128 ** -0.5)


# ----------------------------------------------------------------------------- processors

def _transformer_inputs(transformer, T=2, H=8, W=8, batch=1):
    x = torch.randn(batch, 16, T, H, W)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, 6, TINY_TEXT_DIM)
    return x, t, ctx


def test_self_attention_matches_explicit_reference(components):
    transformer = components["transformer"]
    attn = transformer.blocks[0].attn1
    T, H, W = 2, 5, 7  # token grid
    base = (3, 4)
    x = torch.randn(2, T * H * W, attn.inner_dim)
    freqs_cos, freqs_sin = transformer.rope(torch.zeros(1, 16, T, 2 * H, 2 * W))
    head_dim = transformer.config.attention_head_dim
    scale = freeswim_attention_scale(head_dim, base[0] * base[1], H * W)
    state = FreeSwimState(pattern=freeswim_pattern((T, H, W), base), scale=scale)
    with freeswim_processors(transformer, state):
        proc = attn.processor
        out = proc(copy.deepcopy(attn).double(), x.double(), None, None, (freqs_cos.double(), freqs_sin.double()))
    mask = spec_mask(T, H, W, base[0] // 2, base[1] // 2)
    ref = explicit_self_attention(attn, x, freqs_cos, freqs_sin, mask, scale)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)  # RoPE tables are float32
    # the temperature matters: with the default scale the result is different
    ref_default = explicit_self_attention(attn, x, freqs_cos, freqs_sin, mask, head_dim ** -0.5)
    assert (out - ref_default).abs().max() > 1e-4
    # and the processors are restored afterwards
    assert type(attn.processor).__name__ == "WanAttnProcessor"


def _record_attn2(transformer):
    records = []

    def hook(module, args, out):
        records.append((args[0].clone(), args[1].clone(), out.clone()))

    return records, [blk.attn2.register_forward_hook(hook) for blk in transformer.blocks]


def test_cross_attention_override_and_cache(components):
    transformer = components["transformer"]
    x, t, ctx = _transformer_inputs(transformer, T=2, H=8, W=8)  # token grid (2, 4, 4)
    grid, base = (2, 4, 4), (2, 2)  # window (2, 3, 3) < grid: the two branches differ
    state = FreeSwimState(pattern=freeswim_pattern(grid, base), scale=freeswim_attention_scale(12, 4, 16))
    records, hooks = _record_attn2(transformer)
    try:
        with freeswim_processors(transformer, state):
            state.set_mode("dual", store_cross=True)
            out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                              encoder_hidden_states=torch.cat([ctx, ctx]), return_dict=False)[0]
            dual = list(records)
            cache = [state.cross_cache[f"blocks.{i}.attn2.processor"].clone() for i in range(len(dual))]
            records.clear()
            state.set_mode("reuse")
            out_reuse = transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
            reuse = list(records)
    finally:
        for h in hooks:
            h.remove()
    assert len(dual) == len(transformer.blocks) == len(cache)
    for (inp, text, o), blk in zip(dual, transformer.blocks):
        # the window rows reach attn2 with different hidden states, yet both branches' outputs are identical
        assert not torch.allclose(inp[:1], inp[1:])
        assert torch.equal(o[:1], o[1:])
        # ... and equal the full rows' own cross-attention (diffusers' stock processor, restored by now)
        stock = blk.attn2.processor(blk.attn2, inp[1:], text[1:])
        torch.testing.assert_close(o[1:], stock, rtol=1e-5, atol=1e-6)
    # reuse: each layer's cross-attention output is the stored tensor through to_out, bit for bit, although the
    # window rows' hidden states differ from those the cache was computed from
    for (inp, text, o), blk, c in zip(reuse, transformer.blocks, cache):
        assert torch.equal(o, blk.attn2.to_out[0](c))
    assert state.counts["cross_reuse"] == len(transformer.blocks)
    assert out.shape == (2, 16, 2, 8, 8) and out_reuse.shape == (1, 16, 2, 8, 8)
    assert not state.cross_cache  # dropped on exit


def test_grid_within_window_branches_equal(components):
    transformer = components["transformer"]
    x, t, ctx = _transformer_inputs(transformer, T=2, H=4, W=6)  # token grid (2, 2, 3)
    state = FreeSwimState(pattern=freeswim_pattern((2, 2, 3), (2, 3)), scale=0.3)
    assert state.pattern.window == (2, 2, 3)
    with freeswim_processors(transformer, state):
        state.set_mode("dual")
        out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                          encoder_hidden_states=torch.cat([ctx, ctx]), return_dict=False)[0]
    torch.testing.assert_close(out[:1], out[1:], rtol=1e-6, atol=1e-6)
    assert state.counts["full_self"] == len(transformer.blocks)


# ----------------------------------------------------------------------------- pipeline

def _count_full_attention(monkeypatch, pipe):
    """Count Dense self-attention calls (nq == nk == grid tokens) per denoising step via kernels.attention."""
    calls, current = [], {"step": 0}
    real = kernels.attention

    def counting(q, k, v, pattern=None, **kw):
        if isinstance(pattern, kernels.Dense) and q.shape[2] == k.shape[2]:
            calls.append(current["step"])
        return real(q, k, v, pattern=pattern, **kw)

    def on_step_end(p, i, t, tensors):
        current["step"] = i + 1
        return tensors

    monkeypatch.setattr(kernels, "attention", counting)
    return calls, on_step_end


@pytest.mark.parametrize("cache_steps", [2, 3, None])
def test_cache_runs_full_attention_only_on_refresh_steps(pipe, monkeypatch, cache_steps):
    calls, on_step_end = _count_full_attention(monkeypatch, pipe)
    steps = 5
    pipe(**call_kwargs(num_inference_steps=10, strength=0.5, cache_steps=cache_steps, height=64, width=96,
                       base_width=48, output_type="latent"),
         generator=gen(0), callback_on_step_end=on_step_end)
    layers = len(pipe.transformer.blocks)
    counts = pipe._freeswim_state.counts
    if cache_steps is None:  # no cache: full path on both guidance passes, every step
        assert sorted(set(calls)) == list(range(steps)) and len(calls) == 2 * layers * steps
        assert counts["cross_reuse"] == 0
    else:
        refresh = list(range(0, steps, cache_steps))
        assert sorted(set(calls)) == refresh and len(calls) == layers * len(refresh)
        assert counts["full_self"] == layers * len(refresh)
        assert counts["cross_reuse"] == layers * (steps - len(refresh))
        # cross-attention computed: cond pass on refresh steps + every uncond pass
        assert counts["cross"] == layers * (len(refresh) + steps)
    assert counts["window_self"] == 2 * layers * steps


def test_window_mode_never_runs_full_attention(pipe, monkeypatch):
    calls, _ = _count_full_attention(monkeypatch, pipe)
    out = pipe(**call_kwargs(mode="window", num_inference_steps=2, height=64, width=96), generator=gen(0)).frames
    assert calls == [] and out.shape == (1, 5, 3, 64, 96)
    assert pipe._freeswim_state.counts["full_self"] == 0


def test_end_to_end_shapes_and_determinism(pipe):
    out = pipe(**call_kwargs(), generator=gen(1))
    assert out.frames.shape == (1, 5, 3, 64, 64) and out.base_frames.shape == (1, 5, 3, 32, 32)
    assert torch.isfinite(out.frames).all() and 0 <= out.frames.min() and out.frames.max() <= 1
    again = pipe(**call_kwargs(), generator=gen(1)).frames
    other = pipe(**call_kwargs(), generator=gen(2)).frames
    assert torch.equal(out.frames, again)
    assert not torch.allclose(out.frames, other)
    # the spec's temperature: sqrt(log_1560(3120) / d_head) at every resolution (the reference's constants)
    head_dim = pipe.transformer.config.attention_head_dim
    assert pipe._freeswim_state.scale == pytest.approx(math.sqrt(math.log(3120) / math.log(1560) / head_dim))
    # image mode and numpy / PIL outputs; transformer processors are stock again afterwards
    img = pipe(**call_kwargs(num_frames=1, height=48, width=80, base_height=32, base_width=48, output_type="np"),
               generator=gen(0)).frames
    assert img.shape == (1, 1, 48, 80, 3)
    pil = pipe(**call_kwargs(num_frames=1, output_type="pil"), generator=gen(0)).frames
    assert pil[0][0].size == (64, 64)
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"WanAttnProcessor"}


def test_prompt_embeds_and_given_video(pipe):
    emb = torch.randn(1, 16, TINY_TEXT_DIM)
    a = pipe(**call_kwargs(prompt=None, prompt_embeds=emb, negative_prompt_embeds=torch.zeros_like(emb)),
             generator=gen(0)).frames
    assert a.shape == (1, 5, 3, 64, 64)
    from PIL import Image

    frames = [Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()) for _ in range(5)]
    b = pipe(**call_kwargs(video=frames), generator=gen(0))
    assert b.frames.shape == (1, 5, 3, 64, 64) and b.base_frames is None
    # a given video reaches the VAE bilinearly upscaled (the reference's cv2 resize), whatever its frame type:
    # PIL frames, a numpy (F, H, W, C) array in [0, 1] and a torch (F, C, H, W) tensor give the same input
    seen = []
    real_encode = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: seen.append(x.detach().clone()) or real_encode(x, *a, **k)
    try:
        arr = torch.stack([torch.from_numpy(np.array(f)) for f in frames]).float() / 255  # (F, H, W, C)
        for v in (frames, arr.numpy(), arr.permute(0, 3, 1, 2)):
            pipe(**call_kwargs(video=v, num_inference_steps=2), generator=gen(0))
    finally:
        pipe.vae.encode = real_encode
    expected = F.interpolate(arr.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear", align_corners=False)
    expected = (expected.clamp(0, 1) * 2 - 1).permute(1, 0, 2, 3)[None]  # (1, 3, F, 64, 64)
    assert len(seen) == 3
    for x in seen:
        torch.testing.assert_close(x.float(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="`video` has 5 frames but `num_frames` is 9"):
        pipe(**call_kwargs(video=frames, num_frames=9))


def test_num_videos_per_prompt_latents_and_numpy_sizes(pipe):
    """WanPipeline's `num_videos_per_prompt` and `latents`; NumPy integers are sizes like ints."""
    out = pipe(**call_kwargs(num_videos_per_prompt=2, num_inference_steps=2), generator=gen(0)).frames
    assert out.shape == (2, 5, 3, 64, 64) and not torch.equal(out[0], out[1])
    noise = torch.randn(1, 16, 2, 8, 8, generator=gen(3))  # target-resolution noise for mode "window"
    a = pipe(**call_kwargs(mode="window", latents=noise, num_inference_steps=2), generator=gen(0)).frames
    b = pipe(**call_kwargs(mode="window", latents=noise, num_inference_steps=2), generator=gen(1)).frames
    torch.testing.assert_close(a, b)  # the given noise, not the generator's, starts the loop
    c = pipe(**call_kwargs(height=np.int64(64), num_frames=np.int64(5), num_inference_steps=2), generator=gen(0))
    assert c.frames.shape == (1, 5, 3, 64, 64)


def test_spec_smallest_base_and_window_from_base_size(pipe):
    """A 16x16 base (a 1x1 token grid per frame) runs; the pattern's window follows base_height/width."""
    out = pipe(**call_kwargs(base_height=16, base_width=16, height=32, width=32, num_frames=9,
                             num_inference_steps=2), generator=gen(0)).frames
    assert out.shape == (1, 9, 3, 32, 32)
    pipe(**call_kwargs(base_height=32, base_width=48, width=96, num_inference_steps=2), generator=gen(0))
    grid = pipe.token_grid(5, 64, 96)
    assert pipe._freeswim_state.pattern == freeswim_pattern(grid, pipe.token_grid(5, 32, 48)[1:])
    assert pipe._freeswim_state.pattern.window == (grid[0], 2 * (2 // 2) + 1, 2 * (3 // 2) + 1)


def test_diffusers_block_cache_runs_in_every_stage(components):
    """diffusers' FirstBlockCache needs each transformer call inside a `cache_context` (as WanPipeline does)."""
    from diffusers import FirstBlockCacheConfig

    p = FreeSwimWanPipeline(**tiny_wan_components(seed=0))
    p.set_progress_bar_config(disable=True)
    p.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    steps = []
    out = p(**call_kwargs(num_inference_steps=2), generator=gen(0),
            callback_on_step_end=lambda pipe, i, t, kw: steps.append(pipe.current_timestep) or {}).frames
    assert out.shape == (1, 5, 3, 64, 64) and len(steps) == 1 and steps[0] is not None
    assert p.current_timestep is None


@pytest.mark.parametrize("bad,match", [
    (dict(height=60), "height"), (dict(base_width=128), "base resolution must not exceed"),
    (dict(num_frames=4), "num_frames"), (dict(strength=0.0), "strength"), (dict(cache_steps=0), "cache_steps"),
    (dict(mode="tiles"), "mode"), (dict(output_type="gif"), "output_type"),
    (dict(num_videos_per_prompt=0), "num_videos_per_prompt"), (dict(num_frames=5.0), "num_frames"),
    (dict(latents=torch.zeros(1), video=[]), "either `latents`"),
])
def test_check_inputs(pipe, bad, match):
    with pytest.raises(ValueError, match=match):
        pipe(**call_kwargs(**bad))


def test_diffusers_integration(components, tmp_path):
    from diffusers import WanPipeline
    from diffusers.utils import export_to_video

    wan = WanPipeline(**components)
    wan.save_pretrained(tmp_path / "wan")
    loaded = FreeSwimWanPipeline.from_pretrained(tmp_path / "wan")
    piped = FreeSwimWanPipeline.from_pipe(wan)
    assert piped.transformer is wan.transformer
    bar = io.StringIO()
    for p in (loaded, piped):
        p.set_progress_bar_config(file=bar)
    kw = call_kwargs(num_inference_steps=2, strength=1.0)
    a = loaded(**kw, generator=gen(3)).frames
    b = piped(**kw, generator=gen(3)).frames
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert "100%" in bar.getvalue()  # diffusers' progress bar ran (base stage and FreeSwim stage)
    # save_pretrained round trip of the FreeSwim pipeline itself
    piped.save_pretrained(tmp_path / "fs")
    again = FreeSwimWanPipeline.from_pretrained(tmp_path / "fs")
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(again(**kw, generator=gen(3)).frames, b, rtol=0, atol=1e-5)
    # model CPU offload (accelerate hooks; the CPU stands in for the accelerator here)
    pytest.importorskip("accelerate")
    again.enable_model_cpu_offload(device="cpu")
    pil = again(**{**kw, "output_type": "pil"}, generator=gen(3)).frames[0]
    path = export_to_video(pil, str(tmp_path / "v.mp4"), fps=8)
    import imageio.v3 as iio
    assert iio.imread(path).shape == (5, 64, 64, 3)


def test_cli_generate(tmp_path):
    from pipelines.cli import main

    out = tmp_path / "tiny.mp4"
    assert main(["generate", "--pipeline", "freeswim", "--frames", "5", "--steps", "2", "--height", "64",
                 "--width", "64", "--base-height", "32", "--base-width", "32", "--out", str(out), "--quiet"]) == 0
    assert out.exists() and os.path.getsize(out) > 0


def test_cli_generate_usage_errors_and_dtype(tmp_path, capsys, monkeypatch):
    """Bad sizes and paths end as `zoo generate: error: ...` with exit code 2; --dtype reaches the tiny model."""
    from pipelines.cli import main
    from pipelines.freeswim import cli

    base = ["generate", "--pipeline", "freeswim", "--steps", "2", "--height", "64", "--width", "64",
            "--base-height", "32", "--base-width", "32", "--out", str(tmp_path / "x.mp4"), "--quiet"]
    for extra, match in ((["--frames", "6"], "num_frames"), (["--frames", "5", "--model", str(tmp_path / "none")],
                                                              "--model")):
        assert main(base + extra) == 2
        assert "zoo generate: error:" in capsys.readouterr().err
    seen = {}
    real = cli.load_pipeline

    def spy(*a, **k):
        pipe = real(*a, **k)
        seen["dtype"] = pipe.transformer.proj_out.weight.dtype
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", spy)
    assert main(base + ["--frames", "1", "--dtype", "bf16", "--device", "cpu"]) == 0
    assert seen["dtype"] == torch.bfloat16


def test_cli_generate_from_folder_with_sequential_offload_and_vae_tiling(tmp_path, components, monkeypatch):
    from pipelines.cli import main
    from pipelines.freeswim import cli as freeswim_cli

    FreeSwimWanPipeline(**components).save_pretrained(tmp_path / "wan")
    seen = {}
    real = freeswim_cli.load_pipeline

    def spy(*a, **k):
        pipe = real(*a, **k)
        seen.update(tiling=pipe.vae.use_tiling, offload=k["offload"], base=freeswim_cli.base_size_for(pipe))
        return pipe

    monkeypatch.setattr(freeswim_cli, "load_pipeline", spy)
    # accelerate's sequential offload cannot run with the CPU standing in for the accelerator (UMT5 parameters
    # fail to re-materialise); diffusers owns that function: record the call and stay on the CPU
    calls = []
    monkeypatch.setattr(FreeSwimWanPipeline, "enable_sequential_cpu_offload",
                        lambda self, device=None: calls.append(device) or self.to("cpu"))
    out = tmp_path / "frame.png"
    assert main(["generate", "--model", str(tmp_path / "wan"), "--frames", "1", "--steps", "2", "--height", "64",
                 "--width", "64", "--base-height", "32", "--base-width", "32", "--max-sequence-length", "16",
                 "--device", "cpu", "--offload", "sequential", "--vae-tiling", "--out", str(out), "--quiet"]) == 0
    assert out.exists() and seen == dict(tiling=True, offload="sequential", base=(480, 832)) and calls == ["cpu"]


# ----------------------------------------------------------------------------- Wan2.2 two experts

BOUNDARY = 0.85  # stage 3 below (10 steps, strength 0.6, shift 9): t = 931, 900, 857 | 794, 693, 502


@pytest.fixture(scope="module")
def two_expert_components():
    comps = tiny_wan_components(seed=0)
    comps["transformer_2"] = tiny_wan_components(seed=1)["transformer"]
    return comps


def two_expert_pipe(comps, boundary_ratio=BOUNDARY, **over):
    p = FreeSwimWanPipeline(**{**comps, **over}, boundary_ratio=boundary_ratio)
    p.set_progress_bar_config(disable=True)
    return p


def expert_kwargs(**over):
    return call_kwargs(num_inference_steps=10, strength=0.6, base_num_inference_steps=4, **over)


def _record_expert_calls(pipe):
    """(expert, timestep, batch, latent width) of every transformer forward, through forward pre-hooks."""
    calls = []

    def hook(name):
        def fn(module, args, kwargs):
            x = kwargs["hidden_states"]
            calls.append((name, float(kwargs["timestep"].flatten()[0]), x.shape[0], x.shape[-1]))
        return fn

    hooks = [getattr(pipe, n).register_forward_pre_hook(hook(n), with_kwargs=True)
             for n in ("transformer", "transformer_2")]
    return calls, hooks


def test_two_experts_switch_at_boundary_and_refresh_on_switch(two_expert_components, monkeypatch):
    pipe = two_expert_pipe(two_expert_components)
    full_calls, on_step_end = _count_full_attention(monkeypatch, pipe)
    calls, hooks = _record_expert_calls(pipe)
    try:
        pipe(**expert_kwargs(cache_steps=2, output_type="latent"), generator=gen(0), callback_on_step_end=on_step_end)
    finally:
        for h in hooks:
            h.remove()
    boundary = BOUNDARY * 1000
    # every call, base stage (latent width 4) and FreeSwim stage (width 8), went to the expert of its timestep
    assert all((name == "transformer") == (t >= boundary) for name, t, _, _ in calls)
    base = [(n, t) for n, t, _, w in calls if w == 4]
    high = [(n, t, b) for n, t, b, w in calls if w == 8]
    assert {n for n, _ in base} == {"transformer", "transformer_2"}  # diffusers' WanPipeline ran both experts
    # FreeSwim stage: 6 steps, 3 per expert; cond + uncond per step, the cond pass doubled on refresh steps
    steps = sorted({t for _, t, _ in high}, reverse=True)
    assert len(steps) == 6 and sum(t >= boundary for t in steps) == 3
    per_step = {t: [(n, b) for n, tt, b in high if tt == t] for t in steps}
    dual = [i for i, t in enumerate(steps) if any(b == 2 for _, b in per_step[t])]
    assert dual == [0, 2, 3, 5]  # refreshes every 2 steps of each expert, and on the switch (not 0, 2, 4)
    assert [per_step[t][0][0] for t in steps] == ["transformer"] * 3 + ["transformer_2"] * 3
    assert sorted(set(full_calls)) == dual
    layers = len(pipe.transformer.blocks)
    for name, refresh, reuse in (("transformer", 2, 1), ("transformer_2", 2, 1)):
        counts = pipe._freeswim_states[name].counts
        assert counts["full_self"] == layers * refresh and counts["cross_reuse"] == layers * reuse
        assert counts["window_self"] == 2 * layers * 3
    # both experts have diffusers' processors back
    for name in ("transformer", "transformer_2"):
        procs = getattr(pipe, name).attn_processors.values()
        assert {type(p).__name__ for p in procs} == {"WanAttnProcessor"}


def test_two_experts_output_determinism_and_routing(two_expert_components):
    pipe = two_expert_pipe(two_expert_components)
    out = pipe(**expert_kwargs(), generator=gen(1))
    assert out.frames.shape == (1, 5, 3, 64, 64) and out.base_frames.shape == (1, 5, 3, 32, 32)
    assert torch.isfinite(out.frames).all()
    assert torch.equal(pipe(**expert_kwargs(), generator=gen(1)).frames, out.frames)
    assert not torch.allclose(pipe(**expert_kwargs(), generator=gen(2)).frames, out.frames)
    # guidance_scale_2 weights the low-noise expert's steps only
    g2 = pipe(**expert_kwargs(guidance_scale_2=1.5), generator=gen(1)).frames
    assert not torch.allclose(g2, out.frames)
    # a low-noise expert with the high-noise expert's weights gives the single-expert result (no cache, so the
    # refresh schedule is the same); a different transformer_2 does not
    same = two_expert_pipe(two_expert_components, transformer_2=copy.deepcopy(two_expert_components["transformer"]))
    single = FreeSwimWanPipeline(**{k: v for k, v in two_expert_components.items() if k != "transformer_2"})
    single.set_progress_bar_config(disable=True)
    kw = expert_kwargs(cache_steps=None, num_frames=1)
    a, b = same(**kw, generator=gen(4)).frames, single(**kw, generator=gen(4)).frames
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(pipe(**kw, generator=gen(4)).frames, b)


def test_two_experts_from_pipe_and_from_pretrained(two_expert_components, tmp_path):
    from diffusers import WanPipeline

    wan = WanPipeline(**two_expert_components, boundary_ratio=BOUNDARY)
    piped = FreeSwimWanPipeline.from_pipe(wan)
    assert piped.transformer is wan.transformer and piped.transformer_2 is wan.transformer_2
    assert piped.config.boundary_ratio == BOUNDARY
    piped.set_progress_bar_config(disable=True)
    kw = expert_kwargs(num_frames=1)
    ref = two_expert_pipe(two_expert_components)(**kw, generator=gen(5)).frames
    torch.testing.assert_close(piped(**kw, generator=gen(5)).frames, ref, rtol=0, atol=0)
    wan.save_pretrained(tmp_path / "wan22")
    loaded = FreeSwimWanPipeline.from_pretrained(tmp_path / "wan22")
    assert loaded.config.boundary_ratio == BOUNDARY and loaded.transformer_2 is not None
    pytest.importorskip("accelerate")
    loaded.set_progress_bar_config(disable=True)
    loaded.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(loaded(**kw, generator=gen(5)).frames, ref, rtol=0, atol=1e-5)


def test_two_expert_and_image_to_video_checks(two_expert_components):
    from diffusers import WanTransformer3DModel

    no_second = two_expert_pipe(two_expert_components, transformer_2=None)
    with pytest.raises(ValueError, match="transformer_2"):
        no_second(**call_kwargs())
    single = FreeSwimWanPipeline(**{k: v for k, v in two_expert_components.items() if k != "transformer_2"})
    with pytest.raises(ValueError, match="guidance_scale_2"):
        single(**call_kwargs(guidance_scale_2=3.0))
    with pytest.raises(ValueError, match="boundary_ratio"):
        two_expert_pipe(two_expert_components, boundary_ratio=1.5)(**call_kwargs())
    # Wan2.2 I2V experts take the image latents concatenated to the input (36 channels)
    i2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                                out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=1,
                                rope_max_seq_len=32)
    with pytest.raises(NotImplementedError, match="image-to-video"):
        two_expert_pipe(two_expert_components, transformer_2=i2v)(**call_kwargs())


# ----------------------------------------------------------------------------- LoRA

def test_lora_load_runs_freeswim_and_unloads(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # a tiny LoRA on every attention projection, trained weights stood in by random A and B, saved in diffusers'
    # Wan LoRA file format
    donor = tiny_wan_components(seed=0)["transformer"]
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    lora = get_peft_model_state_dict(donor)
    assert any(".attn1.to_q.lora_B" in k for k in lora) and any(".attn2.to_out.0.lora_A" in k for k in lora)
    FreeSwimWanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora)

    pipe = FreeSwimWanPipeline(**tiny_wan_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    kw = call_kwargs(num_inference_steps=6, cache_steps=2, output_type="latent")
    plain = pipe(**kw, generator=gen(6)).frames
    pipe.load_lora_weights(tmp_path, adapter_name="tiny")
    assert "tiny" in pipe.get_active_adapters()
    calls, on_step_end = _count_full_attention(monkeypatch, pipe)
    with_lora = pipe(**kw, generator=gen(6), callback_on_step_end=on_step_end).frames
    assert not torch.allclose(with_lora, plain, atol=1e-3)
    # FreeSwim ran under the LoRA: full attention on refresh steps 0 and 2 only, window attention on every pass
    layers = len(pipe.transformer.blocks)
    assert sorted(set(calls)) == [0, 2] and len(calls) == layers * 2
    counts = pipe._freeswim_state.counts
    assert counts["window_self"] == 2 * layers * 3 and counts["cross_reuse"] == layers
    # the LoRA layers were live inside the FreeSwim processors: scale 0 through attention_kwargs switches them off
    off = pipe(**kw, generator=gen(6), attention_kwargs={"scale": 0.0}).frames
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    pipe.unload_lora_weights()
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"WanAttnProcessor"}
    torch.testing.assert_close(pipe(**kw, generator=gen(6)).frames, plain, rtol=0, atol=1e-6)

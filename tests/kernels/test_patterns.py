"""Pattern masks against their documented definitions (explicit loops), and their properties (hypothesis)."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.patterns import Causal, Dense, Halo, Neighborhood, Window1d


def _axis_window_loop(L, w, s, d, inward, causal, i):
    """The Neighborhood docstring's rule for one axis, written as plain integer code: visible key coordinates."""
    r, p = i % d, i // d
    Lg = len(range(r, L, d))
    if causal:
        leader = min(s * (p // s) + s - 1, Lg - 1)
        keys = range(max(leader - w + 1, 0), p + 1)
    else:
        leader = min(s * (p // s) + s // 2, Lg - 1)
        start = leader - w // 2
        if inward:
            start = max(min(start, Lg - w), 0)
        keys = range(max(start, 0), min(start + w, Lg))
    return {k * d + r for k in keys}


def _neighborhood_loop(p):
    grid = p.grid
    coords = list(itertools.product(*[range(g) for g in grid]))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi, cq in enumerate(coords):
        per_axis = [_axis_window_loop(g, w, s, d, p.inward, a in p.causal_axes, c)
                    for a, (g, w, s, d, c) in enumerate(zip(grid, p.window, p.stride, p.dilation, cq))]
        for ki, ck in enumerate(coords):
            mask[qi, ki] = all(c in vis for c, vis in zip(ck, per_axis))
    return mask


@st.composite
def neighborhoods(draw, max_axes=3, max_len=9):
    n = draw(st.integers(1, max_axes))
    grid = tuple(draw(st.integers(1, max_len)) for _ in range(n))
    window = tuple(draw(st.integers(1, g + 2)) for g in grid)
    causal = tuple(a for a in range(n) if draw(st.booleans()) and draw(st.booleans()))
    stride = tuple(draw(st.integers(1, w)) for w in window)
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(n))
    return Neighborhood(grid, window, stride=stride, dilation=dilation, inward=draw(st.booleans()),
                        causal_axes=causal)


@settings(max_examples=40, deadline=None)
@given(neighborhoods(max_axes=2, max_len=7))
def test_neighborhood_mask_matches_definition(p):
    n = math.prod(p.grid)
    assert torch.equal(p.mask(n, n), _neighborhood_loop(p))


@settings(max_examples=60, deadline=None)
@given(neighborhoods())
def test_neighborhood_properties(p):
    n = math.prod(p.grid)
    m = p.mask(n, n)
    assert m.diagonal().all(), "a query is always in its own window"
    if not p.causal_axes and p.inward:
        # every query sees exactly the window's size: per axis min(w, length of its dilation group)
        coords = torch.tensor(list(itertools.product(*[range(g) for g in p.grid])), dtype=torch.long)
        expected = torch.ones(n, dtype=torch.long)
        for a, (g, w, d) in enumerate(zip(p.grid, p.window, p.dilation)):
            group_len = (g - coords[:, a] % d + d - 1) // d
            expected *= torch.clamp(group_len, max=w)
        assert torch.equal(m.sum(1), expected)
    assert p.density(n, n) == pytest.approx(m.double().mean().item(), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 4), st.integers(0, 4))
def test_freeswim_inward_rule(H, W, dh, dw):
    """Odd windows with inward=True are FreeSwim's `init_mask_flex` rule (specs/generators_lmm.md section 1)."""
    p = Neighborhood((H, W), (2 * dh + 1, 2 * dw + 1))
    m = p.mask(H * W, H * W)
    for qh, qw in itertools.product(range(H), range(W)):
        db, du = max(0, dh - qh), max(0, dh + qh - H + 1)
        dr, dl = max(0, dw - qw), max(0, dw + qw - W + 1)
        ref = torch.zeros(H, W, dtype=torch.bool)
        ref[max(qh - dh - du, 0):qh + dh + db + 1, max(qw - dw - dl, 0):qw + dw + dr + 1] = True
        assert torch.equal(m[qh * W + qw].view(H, W), ref)


def test_inward_false_clips_at_borders():
    p_in, p_out = Neighborhood((9,), (5,)), Neighborhood((9,), (5,), inward=False)
    counts_in, counts_out = p_in.mask(9, 9).sum(1), p_out.mask(9, 9).sum(1)
    assert counts_in.tolist() == [5] * 9
    assert counts_out.tolist() == [3, 4, 5, 5, 5, 5, 5, 4, 3]


def test_stride_leader_is_group_centre():
    # NATTEN: queries of a stride group share the window of the group's centre s // 2
    m = Neighborhood((12,), (4,), stride=(4,)).mask(12, 12)
    assert all(torch.equal(m[i], m[4 * (i // 4)]) for i in range(12))
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert m[4].nonzero().flatten().tolist() == [4, 5, 6, 7]  # leader 6: 6 - 2 .. 6 + 1


def _natten_axis_visible(q, kv, L, w, s, d, causal):
    """NATTEN's per-axis mask predicate as its documentation and reference tests state it (dilation groups,
    stride-group leaders: the centre query non-causal, the last query causal; the window clamped inside)."""
    if q % d != kv % d:
        return False
    qd, kd, Lg = q // d, kv // d, (L - q % d + d - 1) // d
    if causal:
        leader = min((qd // s) * s + s - 1, Lg - 1)
        return qd - kd >= 0 and leader - kd < w
    left, right = w // 2, w // 2 + (w % 2 - 1)
    leader = min((qd // s) * s + s // 2, Lg - 1)
    centre = max(left, min(leader, Lg - 1 - right))
    return centre - left <= kd <= centre + right


@pytest.mark.parametrize("L,w,s,d,causal", [(13, 5, 1, 1, False), (13, 6, 3, 1, False), (17, 4, 4, 2, False),
                                            (11, 3, 2, 3, False), (13, 5, 1, 1, True), (13, 5, 3, 1, True),
                                            (17, 4, 4, 2, True), (10, 7, 5, 1, True)])
def test_neighborhood_axis_matches_natten_rule(L, w, s, d, causal):
    m = Neighborhood((L,), (w,), stride=s, dilation=d, causal_axes=(0,) if causal else ()).mask(L, L)
    expected = torch.tensor([[_natten_axis_visible(q, k, L, w, s, d, causal) for k in range(L)] for q in range(L)])
    assert torch.equal(m, expected)


def test_1d_patterns_match_definitions():
    nq, nk = 7, 11
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    assert Dense().mask(nq, nk).all()
    assert torch.equal(Causal().mask(nq, nk), j <= i + nk - nq)
    assert torch.equal(Window1d(2, 1).mask(nq, nk), (j >= i + nk - nq - 2) & (j <= i + nk - nq + 1))


def test_halo_matches_definition():
    p = Halo((4, 6), block=2, halo=1)
    kg = p.key_grid
    m = p.mask(24, math.prod(kg))
    for (qy, qx), (ky, kx) in itertools.product(itertools.product(range(4), range(6)),
                                                itertools.product(range(kg[0]), range(kg[1]))):
        vis = (qy // 2) * 2 <= ky < (qy // 2) * 2 + 4 and (qx // 2) * 2 <= kx < (qx // 2) * 2 + 4
        assert bool(m[qy * 6 + qx, ky * kg[1] + kx]) == vis

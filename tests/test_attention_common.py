"""The attention helpers the CUDA kernels inline (csrc/attention_common.h), run on the CPU.

tests/csrc/attention_common_probe.cpp exposes them through C entry points; the test builds it with
the host C++ compiler and checks them against fastlm.ops.reference: the bottom-right causal mask, the
sliding-window and document masks (each row's interval of keys, the rows a key tile needs, checked
against the dense mask of tests/mask_rule.py), the
tile predicates that let a kernel skip masking or a whole tile, the causal launch order, the
exp2 (log2-unit) scores with the scale folded into one FMA, and the forward/backward tile walks
of the CUDA kernels replayed in Python with these helpers (online softmax, LSE, P for dS).
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mask_rule import doc_bounds, doc_ids, visible

from fastlm.ops import reference

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "csrc" / "attention_common_probe.cpp"
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (c++/g++/clang++)")

_I, _F = ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "probe_is_visible": (ctypes.c_int, [_I, _I, _I, _I, ctypes.c_int]),
    "probe_first_row_seeing_key": (_I, [_I, _I, _I, ctypes.c_int]),  # (plain causal / full masks)
    "probe_key_blocks_for_rows": (_I, [_I, _I, _I, ctypes.c_int, _I]),
    "probe_kv_head": (_I, [_I, _I, _I]),
    "probe_masked_score_log2": (_F, [_F, _F, _F, _I, _I, _I, _I, ctypes.c_int]),
    "probe_exp2_arg": (_F, [_F, _F, _F]),
    "probe_exp2": (_F, [_F]),
    "probe_rescale_factor_log2": (_F, [_F, _F]),
    "probe_safe_max": (_F, [_F]),
    "probe_row_lse_from_log2": (_F, [_F, _F]),
    "probe_backward_shift": (_F, [_F]),
    "probe_block_for_slot": (_I, [_I, _I, ctypes.c_int]),
    "probe_tile_fully_visible": (ctypes.c_int, [_I, _I, _I, _I, _I, ctypes.c_int]),
    "probe_tile_fully_masked": (ctypes.c_int, [_I, _I, _I, _I, _I, ctypes.c_int]),
    "probe_log2e": (_F, []),
    "probe_row_keys": (None, [_I, _I, _I, ctypes.c_int, _I, ctypes.c_void_p, ctypes.c_void_p]),
    "probe_block_keys": (None, [_I, _I, _I, _I, ctypes.c_int, _I, ctypes.c_void_p, ctypes.c_void_p]),
    "probe_tile_visible_all": (ctypes.c_int, [_I, _I, _I, _I, _I, _I, ctypes.c_int, _I, ctypes.c_void_p]),
    "probe_tile_masked_all": (ctypes.c_int, [_I, _I, _I, _I, _I, _I, ctypes.c_int, _I, ctypes.c_void_p]),
    "probe_first_row_seeing": (_I, [_I, _I, _I, ctypes.c_int, _I, ctypes.c_void_p]),
    "probe_end_row_seeing": (_I, [_I, _I, _I, ctypes.c_int, _I, ctypes.c_void_p]),
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    lib_path = tmp_path_factory.mktemp("probe") / "attention_common_probe.so"
    cmd = [CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(ROOT / "csrc"), str(PROBE), "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(str(lib_path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


SHAPES = [(1, 1), (5, 5), (7, 19), (19, 7), (16, 64), (33, 33), (64, 17)]


@pytest.mark.parametrize("t_q,t_k", SHAPES)
def test_visibility_matches_reference_mask(probe, t_q, t_k):
    ref = reference.causal_mask(t_q, t_k)
    got = torch.tensor([[bool(probe.probe_is_visible(i, j, t_q, t_k, 1)) for j in range(t_k)] for i in range(t_q)])
    assert torch.equal(got, ref)
    assert all(probe.probe_is_visible(i, j, t_q, t_k, 0) for i in range(t_q) for j in range(t_k))
    for j in range(t_k):  # the dK/dV kernels start their query loop at this row
        rows = ref[:, j].nonzero().flatten()
        assert probe.probe_first_row_seeing_key(j, t_q, t_k, 1) == int(rows[0])


@pytest.mark.parametrize("t_q,t_k", SHAPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 8), (16, 16)])
def test_tile_predicates_match_mask(probe, t_q, t_k, rows, cols):
    mask = reference.causal_mask(t_q, t_k)
    for causal in (0, 1):
        for i0 in range(0, t_q - rows + 1, max(1, rows // 2)):
            for j0 in range(0, t_k, max(1, cols // 2)):
                tile = mask[i0 : i0 + rows, j0 : j0 + cols]
                inside = j0 + cols <= t_k
                full = bool(probe.probe_tile_fully_visible(i0, j0, cols, t_q, t_k, causal))
                empty = bool(probe.probe_tile_fully_masked(i0, rows, j0, t_q, t_k, causal))
                assert full == (inside and (not causal or bool(tile.all()))), (i0, j0, causal)
                # fully masked: no row of the tile sees key j0 or any later key
                assert empty == (not bool(mask[i0 : i0 + rows, j0:].any()) if causal else False)


@pytest.mark.parametrize("t_q,t_k", SHAPES)
def test_key_blocks_cover_every_visible_key(probe, t_q, t_k):
    mask = reference.causal_mask(t_q, t_k)
    for bm, bn in ((16, 8), (128, 64)):
        for i0 in range(0, t_q, bm):
            i1 = min(i0 + bm, t_q)
            visible = mask[i0:i1].any(dim=0).nonzero().flatten()
            need = 0 if len(visible) == 0 else int(visible[-1]) // bn + 1
            assert probe.probe_key_blocks_for_rows(i1, t_q, t_k, 1, bn) == need
            assert probe.probe_key_blocks_for_rows(i1, t_q, t_k, 0, bn) == -(-t_k // bn)


@pytest.mark.parametrize("n_blocks", [1, 2, 7, 64])
def test_causal_launch_order_puts_heaviest_blocks_first(probe, n_blocks):
    t = n_blocks * 16 - 3
    order = [probe.probe_block_for_slot(s, n_blocks, 1) for s in range(n_blocks)]
    assert sorted(order) == list(range(n_blocks))
    work = [probe.probe_key_blocks_for_rows(min((b + 1) * 16, t), t, t, 1, 16) for b in order]
    assert work == sorted(work, reverse=True)  # non-increasing work in launch order
    if n_blocks > 1:
        assert work[0] > work[-1]
    assert [probe.probe_block_for_slot(s, n_blocks, 0) for s in range(n_blocks)] == list(range(n_blocks))


def test_kv_head_groups_query_heads(probe):
    assert [probe.probe_kv_head(h, 8, 2) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [probe.probe_kv_head(h, 6, 6) for h in range(6)] == list(range(6))


@pytest.mark.parametrize("scale,slope", [(0.125, 0.0), (0.3, 0.25), (1.0, 0.0625)])
def test_log2_scores_and_folded_exp2_match_natural_exp(probe, scale, slope):
    log2e = probe.probe_log2e()
    assert log2e == pytest.approx(1 / math.log(2), rel=1e-7)
    t_q, t_k = 6, 9
    bias = reference.alibi_bias(torch.tensor([slope]), t_q, t_k)[0]
    mask = reference.causal_mask(t_q, t_k)
    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(t_q, t_k, generator=gen) * 4
    m = 1.7
    for i in range(t_q):
        for j in range(t_k):
            x = float(qk[i, j])
            t = probe.probe_masked_score_log2(x, scale * log2e, slope * log2e, i, j, t_q, t_k, 1)
            if not mask[i, j]:
                assert t == -math.inf
                assert probe.probe_exp2(probe.probe_exp2_arg(t, 1.0, m * log2e)) == 0.0
                continue
            natural = x * scale + float(bias[i, j])
            assert t == pytest.approx(natural * log2e, rel=1e-6, abs=1e-6)
            got = probe.probe_exp2(probe.probe_exp2_arg(t, 1.0, m * log2e))
            assert got == pytest.approx(math.exp(natural - m), rel=1e-5)
            if slope == 0.0:  # unmasked tiles: raw qk with the scale folded into the FMA
                folded = probe.probe_exp2(probe.probe_exp2_arg(x, scale * log2e, m * log2e))
                assert folded == pytest.approx(math.exp(x * scale - m), rel=1e-5)


def test_softmax_statistics_edge_values(probe):
    inf = math.inf
    assert probe.probe_rescale_factor_log2(-inf, 3.0) == 0.0  # nothing accumulated yet
    assert probe.probe_rescale_factor_log2(-inf, -inf) == 0.0
    assert probe.probe_rescale_factor_log2(1.0, 3.0) == pytest.approx(0.25)
    assert probe.probe_row_lse_from_log2(-inf, 0.0) == -inf  # fully masked row
    assert probe.probe_row_lse_from_log2(3.0, 2.0) == pytest.approx(4.0 * math.log(2))
    assert math.isnan(probe.probe_row_lse_from_log2(math.nan, 1.0))
    assert probe.probe_backward_shift(-inf) == inf  # its P = exp2(x - inf) = 0
    assert probe.probe_exp2(probe.probe_exp2_arg(5.0, 0.5, inf)) == 0.0


# ---- the kernels' tile walks, replayed with the helpers ------------------------------------------
def _forward_walk(probe, q, k, v, causal, scale, slope, bm, bn):
    """The CUDA forward's per-warp loop for one head: (out, lse) in float32."""
    t_q, t_k = q.shape[0], k.shape[0]
    log2e = probe.probe_log2e()
    plain_ok = slope == 0.0 and scale > 0
    out, lse = torch.zeros_like(q), torch.empty(t_q)
    qk = q @ k.T
    for i0 in range(0, t_q, bm):
        rows = range(i0, min(i0 + bm, t_q))
        m = {i: -math.inf for i in rows}
        l = {i: 0.0 for i in rows}
        acc = torch.zeros(bm, q.shape[1])
        n_tiles = probe.probe_key_blocks_for_rows(rows[-1] + 1, t_q, t_k, causal, bn)
        for j0 in range(0, n_tiles * bn, bn):
            if probe.probe_tile_fully_masked(i0, bm, j0, t_q, t_k, causal):
                continue
            plain = plain_ok and probe.probe_tile_fully_visible(i0, j0, bn, t_q, t_k, causal)
            coef = scale * log2e if plain else 1.0
            cols = range(j0, min(j0 + bn, t_k))
            for r, i in enumerate(rows):
                s = [
                    float(qk[i, j])
                    if plain
                    else probe.probe_masked_score_log2(
                        float(qk[i, j]), scale * log2e, slope * log2e, i, j, t_q, t_k, causal
                    )
                    for j in cols
                ]
                m_new = max(m[i], max(s) * coef)
                alpha = probe.probe_rescale_factor_log2(m[i], m_new)
                shift = probe.probe_safe_max(m_new)
                p = torch.tensor([probe.probe_exp2(probe.probe_exp2_arg(x, coef, shift)) for x in s])
                m[i], l[i] = m_new, l[i] * alpha + float(p.sum())
                acc[r] = acc[r] * alpha + p @ v[j0 : j0 + len(cols)]
        for r, i in enumerate(rows):
            out[i] = acc[r] * (0.0 if l[i] == 0 else 1.0 / l[i])
            lse[i] = probe.probe_row_lse_from_log2(m[i], l[i])
    return out, lse


@pytest.mark.parametrize(
    "t_q,t_k,causal,slope",
    [(13, 13, 1, 0.0), (9, 21, 1, 0.0), (21, 9, 1, 0.0), (11, 17, 0, 0.0), (15, 15, 1, 0.3), (10, 14, 0, 0.2)],
)
def test_forward_tile_walk_matches_reference(probe, t_q, t_k, causal, slope):
    gen = torch.Generator().manual_seed(t_q * 100 + t_k)
    q, k, v = (torch.randn(1, 1, t, 8, generator=gen) for t in (t_q, t_k, t_k))
    scale = 0.35
    slopes = torch.tensor([slope]) if slope else None
    ref_out, ref_lse = reference.attention_forward(q.double(), k.double(), v.double(), bool(causal), scale, slopes)
    out, lse = _forward_walk(probe, q[0, 0], k[0, 0], v[0, 0], causal, scale, slope, bm=4, bn=4)
    torch.testing.assert_close(out.double(), ref_out[0, 0], rtol=2e-5, atol=2e-6)
    finite = torch.isfinite(ref_lse[0, 0])
    assert torch.equal(torch.isfinite(lse), finite)  # fully masked rows: -inf
    torch.testing.assert_close(lse[finite].double(), ref_lse[0, 0][finite], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("t_q,t_k,causal,slope", [(9, 13, 1, 0.0), (13, 9, 1, 0.0), (12, 12, 1, 0.25), (7, 11, 0, 0.0)])
def test_backward_probabilities_match_reference(probe, t_q, t_k, causal, slope):
    """P = exp2(s * coef - lse * log2 e) as the dQ and dK/dV kernels form it, plain or masked."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(t_q, 8, generator=gen), torch.randn(t_k, 8, generator=gen)
    scale, log2e = 0.4, probe.probe_log2e()
    slopes = torch.tensor([slope]) if slope else None
    s_ref, _ = reference._scores(q[None, None].double(), k[None, None].double(), scale, bool(causal), slopes)
    lse = torch.logsumexp(s_ref[0, 0], dim=-1)
    p_ref = torch.exp(s_ref[0, 0] - torch.where(torch.isfinite(lse), lse, torch.inf)[:, None])
    qk = q @ k.T
    for i in range(t_q):
        shift = probe.probe_backward_shift(float(lse[i])) * log2e
        for j in range(t_k):
            plain = slope == 0.0 and probe.probe_tile_fully_visible(i, j, 1, t_q, t_k, causal)
            x = (
                float(qk[i, j])
                if plain
                else probe.probe_masked_score_log2(
                    float(qk[i, j]), scale * log2e, slope * log2e, i, j, t_q, t_k, causal
                )
            )
            p = probe.probe_exp2(probe.probe_exp2_arg(x, scale * log2e if plain else 1.0, shift))
            assert p == pytest.approx(float(p_ref[i, j]), rel=2e-5, abs=1e-7), (i, j)


# ---- sliding window and documents: one interval of keys per row ----------------------------------
def _general_case(seed):
    """A random (T_q, T_k, causal, window, segment ids) and its dense mask from the rule."""
    g = torch.Generator().manual_seed(seed)
    t_k = int(torch.randint(1, 40, (1,), generator=g))
    t_q = int(torch.randint(1, t_k + 12, (1,), generator=g))
    causal = bool(seed % 2)
    window = None if seed % 5 == 0 else int(torch.randint(1, t_k + 4, (1,), generator=g))
    seg = None if seed % 3 == 0 else doc_ids(1, t_k, ("random", "len1", "edges")[seed % 3], g)
    return t_q, t_k, causal, window, seg, visible(1, t_q, t_k, causal, window, seg)[0]


@pytest.mark.parametrize("seed", range(16))
def test_row_intervals_and_row_search_match_the_rule(probe, seed):
    t_q, t_k, causal, window, seg, mask = _general_case(seed)
    bounds = None if seg is None else doc_bounds(seg)[0].contiguous()
    args = (t_q, t_k, int(causal), window or 0, None if bounds is None else bounds.data_ptr())
    out = (ctypes.c_int64 * 2)()
    ranges = []
    for i in range(t_q):
        probe.probe_row_keys(i, *args, out)
        seen = mask[i].nonzero().flatten()
        want = (0, 0) if len(seen) == 0 else (int(seen[0]), int(seen[-1]) + 1)
        assert tuple(out) == want, (i, tuple(out), want)
        assert mask[i, want[0] : want[1]].all()  # one interval: the rule gives no holes
        ranges.append(want)
    nonempty = [r for r in ranges if r[1] > r[0]]
    assert nonempty == sorted(nonempty) and [r[1] for r in nonempty] == sorted(r[1] for r in nonempty)
    for j0 in range(t_k):  # the backward's rows of a key tile: exactly the rows that see one of its keys
        for j1 in range(j0 + 1, min(t_k, j0 + 9) + 1):
            rows = mask[:, j0:j1].any(1).nonzero().flatten()
            first, end = probe.probe_first_row_seeing(j0, *args), probe.probe_end_row_seeing(j1, *args)
            if len(rows):
                assert (first, end) == (int(rows[0]), int(rows[-1]) + 1)
                assert mask[first:end, j0:j1].any(1).all()
            else:
                assert first >= end


@pytest.mark.parametrize("seed", range(16))
def test_tile_predicates_of_window_and_document_masks(probe, seed):
    """Fully visible tiles need no mask, fully masked ones are skipped: both exact on the rule
    (a masked tile may only be taken for partly visible when its first row sees nothing at all)."""
    t_q, t_k, causal, window, seg, mask = _general_case(seed)
    bounds = None if seg is None else doc_bounds(seg)[0].contiguous()
    tail = (t_q, t_k, int(causal), window or 0, None if bounds is None else bounds.data_ptr())
    out = (ctypes.c_int64 * 2)()
    for rows, cols in ((1, 1), (3, 4), (8, 5), (16, 16)):
        for i0 in range(0, t_q, max(1, rows // 2)):
            i1 = min(i0 + rows, t_q)
            probe.probe_block_keys(i0, i0 + rows, *tail, out)
            seen = mask[i0:i1].any(0).nonzero().flatten()
            if len(seen):  # the block's keys: every key its rows see, tight at the top
                assert out[0] <= int(seen[0]) and out[1] == int(seen[-1]) + 1
                assert out[0] == int(seen[0]) or not mask[i0].any()
            else:
                assert out[1] <= out[0]
            for j0 in range(0, t_k, max(1, cols // 2)):
                tile = mask[i0:i1, j0 : j0 + cols]
                full = bool(probe.probe_tile_visible_all(i0, i0 + rows, j0, j0 + cols, *tail))
                empty = bool(probe.probe_tile_masked_all(i0, i0 + rows, j0, j0 + cols, *tail))
                assert full == (j0 + cols <= t_k and bool(tile.all())), (i0, j0, rows, cols)
                assert not empty or not tile.any(), (i0, j0, rows, cols)
                if mask[i0].any():
                    assert empty == (not tile.any()), (i0, j0, rows, cols)

"""Fused attention in Triton: FlashAttention-2 forward and backward, plus a split-KV decode path.

Layout and semantics are those of :func:`fastlm.ops.attention`: q ``(B, H, T_q, D)``, k/v
``(B, H_kv, T_k, D)`` with any strides (a ``(B, T, H, D)`` tensor ``.transpose(1, 2)`` is read
in place), grouped-query attention (query head ``h`` reads kv head ``h // (H // H_kv)``; K/V are
never repeated in memory), causal masking aligned **bottom-right** (query ``i`` sees keys
``j <= i + T_k - T_q``), ALiBi ``score -= slope_h * |i + T_k - T_q - j|``, head dims 1..256
(padded to a power of two >= 16 with masks), float16 / bfloat16 / float32.

Sliding windows and documents (the rule of :mod:`fastlm.ops.masks`; ``HAS_WINDOW`` / ``HAS_DOCS``
constexprs, so the unmasked kernels compile as before): each query row sees one run of keys
``[row_lo, row_hi)`` (documents as per-position bounds, :func:`document_bounds`). A block of rows walks
only the key tiles of its rows' union, unmasked where every row sees the whole tile, masked on
the tiles the runs cut; dK/dV read the same rule by column and walk the row tiles of its keys'
union; the split-KV chunks tile the rows' union, not all of T_k. Tiles the mask hides are never
loaded. The ops keep the LSE in log2 units (see :func:`_forward`).

Kernels (all of them keep the T x T score matrix in registers, one tile at a time):

* ``_attn_fwd_kernel``: one program per (query block, batch*head). Online softmax in fp32 in the
  base-2 domain (``scale * log2(e)`` folded into one multiplier; in the unmasked blocks the row max
  is taken on the unscaled scores and the ``exp2`` argument is one fused multiply-add), a finite start value for
  the running max and a finite mask value, so fully masked rows give ``l = 0`` -> output zeros,
  ``lse = -inf``. Key blocks are split into an unmasked phase (blocks every row of the query block
  may see) and a masked phase (the causal diagonal and the ragged tail); causal programs skip the
  key blocks above the diagonal and are launched heaviest-first.
* ``_attn_decode_kernel`` + ``_attn_decode_combine_kernel`` (flash-decoding): for few queries
  against a long KV, every program takes one KV chunk for all query rows of one kv head (the
  GQA group's heads x T_q rows share one K/V read) and writes a partial output and LSE; the
  combine kernel merges the chunks.
* backward: ``_attn_bwd_preprocess_kernel`` (``Delta = rowsum(dO * O)``), ``_attn_bwd_dkdv_kernel``
  (one program per key block and kv head; loops over the query blocks of every query head of the
  GQA group, so dK/dV are summed in registers: deterministic, no atomics) and
  ``_attn_bwd_dq_kernel`` (one program per query block). P is recomputed from the saved LSE.

Offsets: per-(batch, head) bases and row offsets are int64. The K/V pointer tiles of the forward,
dQ and decode loops are rebuilt from the loop index in every iteration instead of being advanced
and carried through the loops: carried 2-D pointer tensors change layout between the two loops,
and on Triton 3.6 those conversions made the forward spill (584-1236 bytes at the pinned configs,
255 registers) and the D=128 dQ kernel too; rebuilt, none spills on 3.6 or 3.9.

Kernel objects are built lazily, per mode: ``TRITON_INTERPRET`` (read through ``triton.knobs`` at
launch time, not at import) selects the CPU interpreter with one small fixed block config;
otherwise kernels are compiled and autotuned over a short config list (:data:`CONFIGS`) chosen for
the head dim and dtype, or run with pinned configs (``FASTLM_TRITON_CONFIGS``, see
:mod:`fastlm.kernels.launch`), keyed on (head dim, causal, ALiBi, power-of-two bucket of T_q and T_k). The head dim is a
compile-time constant (one compile per model head dim): with it the ``d < HEAD_DIM`` mask of a
non-power-of-two head dim (40, 80, 96) keeps 16-byte vector loads and cp.async pipelining. The ops are
``torch.library.triton_op`` s (``fastlm::triton_attention_fwd`` / ``_bwd``) with autograd, so
``torch.compile(fullgraph=True)`` traces them on GPU.
"""

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastlm.ops._autograd import register_attention_autograd

from .launch import device_function, interpreting, is_traced, jit, pinned_configs, wrap

__all__ = ["attention", "attention_forward", "attention_backward", "attention_decode", "use_split_kv", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# =================================================================================================
# Kernels (plain functions; launch.jit / _tuned_kernel turn them into JIT / interpreted / autotuned
# kernels on first use, so the TRITON_INTERPRET decision is made at launch time). Their helpers are
# launch.device_function objects (inlined when compiled, plain calls when interpreted); they call no
# other @jit function, not even triton.language's own (tl.cdiv, tl.zeros, tl.max, tl.sum, tl.sigmoid are
# @jit functions created in the mode triton was imported in, which an interpreted kernel cannot call):
# reductions go through the builtin tl.reduce with the standard combine functions, which the
# interpreter maps to numpy whatever the import mode. (The reverse does not hold: with triton
# imported under TRITON_INTERPRET=1 those combine functions cannot be compiled, so import triton
# before turning the interpreter on when a process also compiles, as benchmarks.gpu_check does.)
# =================================================================================================
def _key_runs(pos, ok, docs, WINDOW, T_K, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """``(lo, hi)``: the keys ``[lo, hi)`` that queries at key positions ``pos`` see, by the rule of
    fastlm.ops.masks (one run per query, whose ends never move left as the position grows); ``docs``
    is the batch row of the document bounds (``(2, T_K)``: first position, one past the last), read
    where ``ok``. A query before key 0 has no document: it sees nothing then."""
    lo = pos * 0
    hi = lo + T_K
    if CAUSAL:
        hi = tl.minimum(hi, pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos - WINDOW + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, pos + WINDOW)
    if HAS_DOCS:
        in_doc = ok & (pos >= 0)
        lo = tl.maximum(lo, tl.load(docs + pos, mask=in_doc, other=0))
        hi = tl.minimum(hi, tl.load(docs + T_K + pos, mask=in_doc, other=0))
    return lo, hi


def _tiles(run_lo, run_hi, ok, T, BLOCK: tl.constexpr, RAGGED_FULL: tl.constexpr):
    """The tiles of ``BLOCK`` a block walks, from the runs ``[run_lo, run_hi)`` of its members (``ok``):
    ``(lo, hi, full_lo, full_hi)``. ``[lo, hi)`` covers the union of the runs from the tile it starts in;
    every member sees the tiles ``[full_lo, full_hi)`` whole (no mask needed; empty, with ``full_lo =
    full_hi = lo``, when no tile is, which a member that sees nothing ensures). ``RAGGED_FULL``: the
    ragged last tile counts as whole when every run reaches ``T`` (its loads are masked). Every bound
    but ``hi`` (and ``full_hi = T`` there) is a multiple of BLOCK."""
    seen = ok & (run_hi > run_lo)
    lo = tl.reduce(tl.where(seen, run_lo, T), 0, tl.standard._elementwise_min) // BLOCK * BLOCK
    hi = tl.reduce(tl.where(seen, run_hi, 0), 0, tl.standard._elementwise_max)
    full_lo = tl.reduce(tl.where(ok, run_lo, 0), 0, tl.standard._elementwise_max)
    full_lo = (full_lo + BLOCK - 1) // BLOCK * BLOCK
    full_hi = tl.reduce(tl.where(ok, run_hi, T), 0, tl.standard._elementwise_min)
    if RAGGED_FULL:
        full_hi = tl.where(full_hi >= T, T, tl.maximum(full_hi, 0) // BLOCK * BLOCK)
    else:
        full_hi = tl.maximum(full_hi, 0) // BLOCK * BLOCK
    has_full = full_hi > full_lo
    return lo, hi, tl.where(has_full, full_lo, lo), tl.where(has_full, full_hi, lo)


def _row_block_keys(start_m, offs_m, row_ok, docs, WINDOW, T_Q, T_K, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    """The key loops of a block of query rows (forward, dQ): ``(row_lo, row_hi, full_lo, full_hi,
    mask_lo, hi)``. The unmasked loop walks ``range(full_lo, full_hi)``, the masked one
    ``range(mask_lo, hi)``: the causal diagonal and the ragged key tail, or with a window or documents
    the slots of ``[lo, full_lo)`` (those below ``full_hi``: shift them by ``full_lo - full_hi``)
    then ``[full_hi, hi)``, masked by each row's run ``[row_lo, row_hi)`` (dummies without masks)."""
    offset = T_K - T_Q  # bottom-right alignment: row i sits at key position i + offset
    row_lo = offs_m * 0
    row_hi = row_lo
    if HAS_WINDOW or HAS_DOCS:
        row_lo, row_hi = _key_runs(offs_m + offset, row_ok, docs, WINDOW, T_K, CAUSAL, HAS_WINDOW, HAS_DOCS)
        lo, hi, full_lo, full_hi = _tiles(row_lo, row_hi, row_ok, T_K, BLOCK_N, False)
        mask_lo = full_hi - (full_lo - lo)
    elif CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + offset, T_K), 0)
        full_hi = tl.maximum(tl.minimum(start_m + offset + 1, hi), 0)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        full_lo = full_hi * 0
        mask_lo = full_hi
    else:
        hi = T_K
        full_hi = (T_K // BLOCK_N) * BLOCK_N
        full_lo = full_hi * 0
        mask_lo = full_hi
    return row_lo, row_hi, full_lo, full_hi, mask_lo, hi


def _visible(cols, col_ok, pos, row_lo, row_hi, CAUSAL: tl.constexpr, MASKS: tl.constexpr):
    """``(rows, keys)`` bool of a masked tile: keys ``cols`` (``col_ok``: below T_K) seen by the rows
    at key positions ``pos``, whose runs are ``[row_lo, row_hi)`` with ``MASKS`` (window, documents)."""
    if MASKS:
        visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
    else:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= pos[:, None])
    return visible


_key_runs = device_function(_key_runs)
_tiles = device_function(_tiles)
_row_block_keys = device_function(_row_block_keys)
_visible = device_function(_visible)


def _attn_fwd_kernel(
    Q, K, V, O, LSE, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, T_Q, T_K, qk_scale,
    T_Q_BUCKET, T_K_BUCKET,  # autotune keys only
    DOCS, WINDOW,  # masks: document bounds (B, 2, T_K) int32 (with HAS_DOCS), window (with HAS_WINDOW)
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, NEG_SCALE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    num_m = (T_Q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // num_m
    mb = pid % num_m
    if CAUSAL:
        mb = num_m - 1 - mb  # the longest rows first: better tail balance
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = mb * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < T_Q

    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m.to(tl.int64)[:, None] * stride_qm
        + offs_d[None, :] * stride_qd
    )
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634

    offset = T_K - T_Q  # bottom-right alignment: row i sits at key position i + offset
    row_lo, row_hi, full_lo, full_hi, mask_lo, hi = _row_block_keys(
        start_m,
        offs_m,
        row_ok,
        DOCS + b.to(tl.int64) * 2 * T_K,
        WINDOW,
        T_Q,
        T_K,
        CAUSAL,
        HAS_WINDOW,
        HAS_DOCS,
        BLOCK_M,
        BLOCK_N,
    )

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: exp2(m_i - m_new) never NaN
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    # phase 1: key blocks that every row of this query block sees completely (no mask math)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        kv_rows = (start_n + offs_n).to(tl.int64)[:, None]
        k_ptrs = k_base + kv_rows * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + kv_rows * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled scores
        if HAS_ALIBI:
            dist = tl.abs(offs_m[:, None] + offset - (start_n + offs_n)[None, :]).to(tl.float32)
            qk = qk * qk_scale - slope * dist
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
            p = tl.exp2(qk - m_new[:, None])
        else:
            # the row max of the unscaled scores, scaled once per row (the min for a negative
            # scale); then one fused multiply-add per score for the exp2 argument
            if NEG_SCALE:
                row_max = tl.reduce(qk, 1, tl.standard._elementwise_min) * qk_scale
            else:
                row_max = tl.reduce(qk, 1, tl.standard._elementwise_max) * qk_scale
            m_new = tl.maximum(m_i, row_max)
            p = tl.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    # phase 2: the causal diagonal, the ragged key tail and the tiles that masks cut
    for start_n in range(mask_lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if HAS_WINDOW or HAS_DOCS:  # slots below full_hi are the tiles left of phase 1's
            cols += tl.where(start_n < full_hi, full_lo - full_hi, 0)
        col_ok = cols < T_K
        k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_ALIBI:
            dist = tl.abs(offs_m[:, None] + offset - cols[None, :]).to(tl.float32)
            qk = qk - slope * dist
        visible = _visible(cols, col_ok, offs_m + offset, row_lo, row_hi, CAUSAL, HAS_WINDOW or HAS_DOCS)
        qk = tl.where(visible, qk, -1.0e38)  # finite mask value, far below the -1e30 start
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # fully masked rows: acc = 0 -> 0
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))  # base 2
    o_ptrs = (
        O
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * T_Q + offs_m, lse, mask=row_ok)


def _attn_decode_kernel(
    Q, K, V, O_PART, LSE_PART, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H_KV, GROUP, T_Q, T_K, qk_scale, CHUNK, N_SPLITS,
    DOCS, WINDOW,  # masks, as in _attn_fwd_kernel; the chunks then split the rows' union of keys
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # rows r = g * T_Q + i: query head hk * GROUP + g, query position i (all rows of a GQA group)
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * T_Q
    g = rows // T_Q
    i = rows % T_Q
    h = hk * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64)[:, None] * stride_qh
        + i.to(tl.int64)[:, None] * stride_qm
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, T_K)
    offset = T_K - T_Q
    row_lo = i * 0  # each row's run of keys (with masks; dummies without)
    row_hi = row_lo
    if HAS_WINDOW or HAS_DOCS:  # the chunks tile the rows' union
        row_lo, row_hi = _key_runs(
            i + offset, row_ok, DOCS + b.to(tl.int64) * 2 * T_K, WINDOW, T_K, CAUSAL, HAS_WINDOW, HAS_DOCS
        )
        seen = row_ok & (row_hi > row_lo)
        lo = lo + tl.reduce(tl.where(seen, row_lo, T_K), 0, tl.standard._elementwise_min) // BLOCK_N * BLOCK_N
        hi = tl.minimum(lo + CHUNK, tl.reduce(tl.where(seen, row_hi, 0), 0, tl.standard._elementwise_max))
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_ALIBI:
            dist = tl.abs(i[:, None] + offset - cols[None, :]).to(tl.float32)
            qk = qk - slope[:, None] * dist
        visible = _visible(cols, col_ok, i + offset, row_lo, row_hi, CAUSAL, HAS_WINDOW or HAS_DOCS)
        qk = tl.where(visible, qk, -1.0e38)
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))  # base 2
    part = (bhk.to(tl.int64) * N_SPLITS + split) * BLOCK_M
    tl.store(O_PART + (part + rows)[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(LSE_PART + part + rows, lse2)


def _attn_decode_combine_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_om, stride_od,
    H_KV, GROUP, T_Q, N_SPLITS,
    HEAD_DIM: tl.constexpr, PART_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_rows = GROUP * T_Q
    bhk = pid // n_rows
    r = pid % n_rows
    b = bhk // H_KV
    hk = bhk % H_KV
    h = hk * GROUP + r // T_Q
    i = r % T_Q
    s = tl.arange(0, BLOCK_S)
    s_ok = s < N_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    part = (bhk.to(tl.int64) * N_SPLITS + s) * PART_M + r
    lse_s = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    m = tl.reduce(lse_s, 0, tl.standard._elementwise_max)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)  # empty chunks (lse = -inf) weigh 0
    denom = tl.reduce(w, 0, tl.standard._sum_combine)
    o_s = tl.load(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    den_safe = tl.where(denom > 0.0, denom, 1.0)
    out = tl.reduce(o_s * w[:, None], 0, tl.standard._sum_combine) / den_safe
    lse = tl.where(denom > 0.0, m_safe + tl.log2(den_safe), float("-inf"))  # base 2
    bh = b * (H_KV * GROUP) + h
    o_ptrs = (
        O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om + offs_d * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * T_Q + i, lse)


def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    num_m = (T_Q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // num_m
    mb = pid % num_m
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        O
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m.to(tl.int64)[:, None] * stride_om
        + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO
        + b.to(tl.int64) * stride_dob
        + h.to(tl.int64) * stride_doh
        + offs_m.to(tl.int64)[:, None] * stride_dom
        + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    delta = tl.reduce(o * do, 1, tl.standard._sum_combine)
    tl.store(DELTA + bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)


def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, GROUP, T_Q, T_K, qk_scale, sm_scale,
    T_Q_BUCKET, T_K_BUCKET,  # autotune keys only
    DOCS, WINDOW,  # masks, as in the forward
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    H_KV = H // GROUP
    num_n = (T_K + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    bhk = pid // num_n
    nb = pid % num_n
    b = bhk // H_KV
    hk = bhk % H_KV
    start_n = nb * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < T_K)[:, None] & d_ok[None, :]
    k = tl.load(
        K
        + b.to(tl.int64) * stride_kb
        + hk.to(tl.int64) * stride_kh
        + offs_n.to(tl.int64)[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V
        + b.to(tl.int64) * stride_vb
        + hk.to(tl.int64) * stride_vh
        + offs_n.to(tl.int64)[:, None] * stride_vn
        + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)

    offset = T_K - T_Q
    if HAS_WINDOW or HAS_DOCS:
        # the rule of fastlm.ops.masks read by column: key j is seen by the rows [col_lo, col_hi);
        # the program walks the row tiles of the columns' union and masks none inside their
        # intersection (the ragged last row tile counts as inside when it reaches T_Q)
        col_ok = offs_n < T_K
        j_row = offs_n - offset  # the row at key position j
        col_lo = tl.full([BLOCK_N], 0, dtype=tl.int32)
        col_hi = col_lo + T_Q
        if CAUSAL:
            col_lo = tl.maximum(col_lo, j_row)
        if HAS_WINDOW:
            col_hi = tl.minimum(col_hi, j_row + WINDOW)
            if not CAUSAL:
                col_lo = tl.maximum(col_lo, j_row - WINDOW + 1)
        if HAS_DOCS:
            doc_ptrs = DOCS + b.to(tl.int64) * 2 * T_K + offs_n
            col_lo = tl.maximum(col_lo, tl.load(doc_ptrs, mask=col_ok, other=0) - offset)
            col_hi = tl.minimum(col_hi, tl.load(doc_ptrs + T_K, mask=col_ok, other=0) - offset)
        lo, mask_end, full_lo, full_hi = _tiles(col_lo, col_hi, col_ok, T_Q, BLOCK_M, True)
        mask_hi = full_lo + tl.maximum(mask_end - full_hi, 0)  # the masked slots: [lo, full_lo), [full_hi, mask_end)
    elif CAUSAL:
        # rows < lo see none of these keys; rows >= full_lo see all of them
        lo = tl.maximum(start_n - offset, 0)
        lo = tl.minimum((lo // BLOCK_M) * BLOCK_M, T_Q)
        full_lo = tl.maximum(start_n + BLOCK_N - 1 - offset, lo)
        full_lo = (full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mask_hi = tl.minimum(full_lo, T_Q)
        full_hi = T_Q
    else:
        lo = 0
        full_lo = 0
        mask_hi = 0
        full_hi = T_Q

    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        stat_base = bh.to(tl.int64) * T_Q
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        # masked phase (causal diagonal, the tiles masks cut), then the unmasked rest; ragged rows
        # are zeroed by loads
        for start_m in range(lo, mask_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            if HAS_WINDOW or HAS_DOCS:  # slots from full_lo on are the tiles right of the unmasked ones
                offs_m += tl.where(start_m >= full_lo, full_hi - full_lo, 0)
            m_ok = offs_m < T_Q
            qd_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(
                q_base + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0
            )
            do = tl.load(
                do_base + offs_m.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                mask=qd_mask,
                other=0.0,
            )
            lse = tl.load(LSE + stat_base + offs_m, mask=m_ok, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + stat_base + offs_m, mask=m_ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
            if HAS_ALIBI:
                qkT = qkT - slope * tl.abs(offs_m[None, :] + offset - offs_n[:, None]).to(tl.float32)
            pT = tl.exp2(qkT - lse2[None, :])
            if HAS_WINDOW or HAS_DOCS:
                pT = tl.where((offs_m[None, :] >= col_lo[:, None]) & (offs_m[None, :] < col_hi[:, None]), pT, 0.0)
            else:
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < T_Q
            qd_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(
                q_base + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0
            )
            do = tl.load(
                do_base + offs_m.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                mask=qd_mask,
                other=0.0,
            )
            lse = tl.load(LSE + stat_base + offs_m, mask=m_ok, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + stat_base + offs_m, mask=m_ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            if HAS_ALIBI:
                qkT = qkT - slope * tl.abs(offs_m[None, :] + offset - offs_n[:, None]).to(tl.float32)
            pT = tl.exp2(qkT - lse2[None, :])
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)

    dk = dk * sm_scale
    tl.store(
        DK
        + b.to(tl.int64) * stride_dkb
        + hk.to(tl.int64) * stride_dkh
        + offs_n.to(tl.int64)[:, None] * stride_dkn
        + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV
        + b.to(tl.int64) * stride_dvb
        + hk.to(tl.int64) * stride_dvh
        + offs_n.to(tl.int64)[:, None] * stride_dvn
        + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, T_Q, T_K, qk_scale, sm_scale,
    T_Q_BUCKET, T_K_BUCKET,  # autotune keys only
    DOCS, WINDOW,  # masks, as in the forward
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, DELTA_ONLY: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    num_m = (T_Q + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = pid // num_m
    mb = pid % num_m
    if CAUSAL:
        mb = num_m - 1 - mb
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = mb * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < T_Q
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m.to(tl.int64)[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=qd_mask,
        other=0.0,
    )
    do = tl.load(
        DO
        + b.to(tl.int64) * stride_dob
        + h.to(tl.int64) * stride_doh
        + offs_m.to(tl.int64)[:, None] * stride_dom
        + offs_d[None, :] * stride_dod,
        mask=qd_mask,
        other=0.0,
    )
    stat_base = bh.to(tl.int64) * T_Q
    lse = tl.load(LSE + stat_base + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse)
    if DELTA_ONLY:
        delta = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    else:
        delta = tl.load(DELTA + stat_base + offs_m, mask=row_ok, other=0.0)
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    offset = T_K - T_Q
    row_lo, row_hi, full_lo, full_hi, mask_lo, hi = _row_block_keys(
        start_m,
        offs_m,
        row_ok,
        DOCS + b.to(tl.int64) * 2 * T_K,
        WINDOW,
        T_Q,
        T_K,
        CAUSAL,
        HAS_WINDOW,
        HAS_DOCS,
        BLOCK_M,
        BLOCK_N,
    )

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        kv_rows = (start_n + offs_n).to(tl.int64)[:, None]
        k_ptrs = k_base + kv_rows * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + kv_rows * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_ALIBI:
            qk = qk - slope * tl.abs(offs_m[:, None] + offset - (start_n + offs_n)[None, :]).to(tl.float32)
        p = tl.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DELTA_ONLY:
            delta += tl.reduce(p * dp, 1, tl.standard._sum_combine)
        else:
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    for start_n in range(mask_lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if HAS_WINDOW or HAS_DOCS:  # slots below full_hi are the tiles left of the unmasked ones
            cols += tl.where(start_n < full_hi, full_lo - full_hi, 0)
        col_ok = cols < T_K
        k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_ALIBI:
            qk = qk - slope * tl.abs(offs_m[:, None] + offset - cols[None, :]).to(tl.float32)
        visible = _visible(cols, col_ok, offs_m + offset, row_lo, row_hi, CAUSAL, HAS_WINDOW or HAS_DOCS)
        p = tl.where(visible, tl.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DELTA_ONLY:
            delta += tl.reduce(p * dp, 1, tl.standard._sum_combine)
        else:
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    if DELTA_ONLY:
        tl.store(DELTA + stat_base + offs_m, delta, mask=row_ok)
    else:
        dq = dq * sm_scale
        tl.store(
            DQ
            + b.to(tl.int64) * stride_dqb
            + h.to(tl.int64) * stride_dqh
            + offs_m.to(tl.int64)[:, None] * stride_dqm
            + offs_d[None, :] * stride_dqd,
            dq.to(DQ.dtype.element_ty),
            mask=qd_mask,
        )


# =================================================================================================
# Kernel objects: JIT or interpreted (decided at launch), autotuned on GPUs
# =================================================================================================
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and tile width (head dim x element size),
# for Ampere and Hopper, pruned by hand so a first call autotunes in seconds. The first entry of
# each list is the kernel's default pinned config (FASTLM_TRITON_CONFIGS=pinned); every list ends
# with a config small enough for ~100 KB of shared memory (sm_86/89), so autotuning never runs
# out of candidates (configs that do not fit are dropped by the autotuner). dK/dV hold two
# BLOCK_N x D fp32 accumulators: 8 warps where BLOCK_N=128 (the masked kernels: :data:`_MASKED_DEFAULTS`
# where their first entry spills). "decode" is the split-KV kernel's one
# config (never autotuned): BLOCK_M is the least row tile (the GQA group's heads x T_q, rounded up
# to a power of two, when larger). Every entry passes a float64-oracle parity case in the
# interpreter (tests/test_triton_attention.py) and compiled (there on a GPU, and benchmarks.gpu_check).
# Registers / spill stores of causal bf16 compiles for sm_90 (ptxas -v), Triton 3.6 | 3.9, pinned
# defaults: D=64 fwd 128x128x8x3 179|172, dK/dV 32x128x8x3 254|213, dq 128x32x4x3 182|174;
# D=128 fwd 128x64x8x3 170|170, dK/dV 16x128x8x3 250|240, dq 128x64x8x2 189|189; no spills
# (tests check them on both versions). Entries dropped because they spill on 3.6 (bytes, 3.6|3.9):
# D=128 fwd 128x64x4x3 224|168, dK/dV 32x64x8x3 88|0, 32x128x8x3 168|96, 64x128x8x2 244|232,
# dq 128x32x4x3 188|16; D=64 dK/dV 32x64x4x3 36|0. fwd 128x128x8x3 at D=128 takes 224 KiB of
# shared memory (sm_90 has 227; the autotuner drops it on smaller GPUs) and 242|239 registers.
CONFIGS = {
    "fwd": {
        128: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
        256: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 2)],
        512: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        1024: [(32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
    },
    "dkdv": {
        128: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 8, 3), (32, 64, 8, 2)],
        256: [(16, 128, 8, 3), (16, 128, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        512: [(32, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
        1024: [(16, 32, 4, 1), (16, 16, 4, 1)],
    },
    "dq": {
        128: [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
        512: [(64, 32, 4, 2), (64, 16, 4, 2), (32, 32, 4, 2)],
        1024: [(32, 16, 4, 1), (16, 16, 4, 1)],
    },
    "decode": {128: [(16, 64, 4, 3)], 256: [(16, 64, 4, 3)], 512: [(16, 32, 4, 2)], 1024: [(16, 32, 4, 2)]},
}

# One fixed config per kernel in the interpreter (autotuning there is far too slow); BLOCK_M !=
# BLOCK_N on purpose so the tests exercise the causal block bookkeeping with unequal tiles.
_INTERP_BLOCKS = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 16},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 16},
    "decode": {"BLOCK_M": 16, "BLOCK_N": 16},
}
_INTERP_DECODE_MIN_CHUNK = 64

_KEY = ["HEAD_DIM", "T_Q_BUCKET", "T_K_BUCKET", "CAUSAL", "HAS_ALIBI", "GROUP", "HAS_WINDOW", "HAS_DOCS"]
_autotuned: dict = {}


# Pinned defaults of the masked kernels (HAS_WINDOW / HAS_DOCS) where the list's first entry spills:
# (kind, tile width) -> config. dK/dV at D <= 64 (bf16, sm_90, window and documents; Triton 3.6|3.9):
# 32x128x8x3 takes 255|248 registers and spills 12|0 bytes; 32x128x8x2 takes 236|202, no spills. The
# other masked pinned defaults (first entries) do not spill: D=64 fwd 203|217, dq 199|198, decode
# 72|64; D=128 fwd 175|174, dK/dV 255|246, dq 207|207, decode 109|86 (tests check them).
_MASKED_DEFAULTS = {("dkdv", 128): (32, 128, 8, 2)}


def _width(kind: str, block_d: int, elem_size: int) -> int:
    table = CONFIGS[kind]
    row_bytes = block_d * elem_size  # 128: fp16 D<=64; 256: fp16 D=128 / fp32 D=64; 512; 1024
    return min(b for b in table if b >= min(row_bytes, 1024))


def configs(kind: str, block_d: int, elem_size: int) -> list:
    """The config list (tuples, see :data:`CONFIGS`) of kernel ``kind`` for this tile width."""
    return CONFIGS[kind][_width(kind, block_d, elem_size)]


def pinned_default(kind: str, block_d: int, elem_size: int, masked: bool = False) -> tuple:
    """The config kernel ``kind`` runs with ``FASTLM_TRITON_CONFIGS=pinned``: its list's first entry,
    or for a masked kernel the entry :data:`_MASKED_DEFAULTS` names."""
    first = configs(kind, block_d, elem_size)[0]
    return _MASKED_DEFAULTS.get((kind, _width(kind, block_d, elem_size)), first) if masked else first


def _launch_kwargs(config) -> dict:
    m, n, w, s = config
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}


def _fixed_launch(kind: str, block_d: int, elem_size: int, masked: bool = False) -> Optional[dict]:
    """Launch kwargs of kernel ``kind`` when it is not autotuned: a pinned config
    (FASTLM_TRITON_CONFIGS; in the interpreter its tile sizes, so CPU tests check the GPU's
    tiles), the interpreter's fixed blocks; None: autotune."""
    pins = pinned_configs()
    if pins is not None:
        config = pins.get(kind) or pinned_default(kind, block_d, elem_size, masked)
        if interpreting():  # warps and stages mean nothing there
            return {"BLOCK_M": config[0], "BLOCK_N": config[1]}
        return _launch_kwargs(config)
    if interpreting():
        return dict(_INTERP_BLOCKS[kind])
    return None


def _tuned_kernel(kind: str, fn, block_d: int, elem_size: int, masked: bool = False):
    """``(kernel, launch kwargs)``: the plain kernel with :func:`_fixed_launch`'s config, or the
    autotuner over :func:`configs`."""
    fixed = _fixed_launch(kind, block_d, elem_size, masked)
    if fixed is not None:
        return jit(fn), fixed
    key = (kind, block_d, elem_size)
    if key not in _autotuned:
        space = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in configs(kind, block_d, elem_size)
        ]
        _autotuned[key] = triton.autotune(configs=space, key=_KEY)(jit(fn))
    return _autotuned[key], {}


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _bucket(t) -> int:
    """Power-of-two bucket of a sequence length (an autotune key, so a new length does not
    retune). A symbolic length (torch.compile with dynamic shapes) gets 0 instead of a guard that
    would specialize the graph: inductor autotunes user kernels itself and ignores the key."""
    if not isinstance(t, int):
        return 0
    return min(triton.next_power_of_2(max(t, 1)), 1 << 16)


def _dot_prec(dtype) -> str:
    # fp32 inputs: full-precision dot (tf32 would lose ~3 digits against SDPA's fp32 math)
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: Tensor):
    return tuple(t.stride())


_sm_count: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


# =================================================================================================
# Launchers
# =================================================================================================
def use_split_kv(t_q: int, t_k: int, group: int) -> bool:
    """Whether the forward takes the split-KV decode path: few query rows per kv head (the GQA
    group's heads x T_q <= 64, T_q <= 16) against at least 256 keys."""
    return t_q <= 16 and group * t_q <= 64 and t_k >= 256


def document_bounds(segment_ids: Tensor) -> Tensor:
    """``(B, 2, T)`` int32 of segment ids ``(B, T)`` (non-decreasing: documents are runs of equal
    ids): ``[:, 0, t]`` the first position of t's document, ``[:, 1, t]`` one past its last. The
    kernels read these instead of the ids: a row's keys are then two loads away."""
    b, t = segment_ids.shape
    pos = torch.arange(t, device=segment_ids.device).expand(b, t)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # a document starts at t + 1
    edge = torch.ones((b, 1), dtype=torch.bool, device=segment_ids.device)
    lo = torch.where(torch.cat([edge, change], 1), pos, 0).cummax(1).values
    hi = torch.where(torch.cat([change, edge], 1), pos + 1, t).flip(1).cummin(1).values.flip(1)
    return torch.stack([lo, hi], 1).to(torch.int32).contiguous()


def _mask_args(window, segment_ids, t_q, t_k, dummy):
    """The kernels' mask arguments ``(DOCS, WINDOW)`` and their switches ``HAS_WINDOW`` / ``HAS_DOCS``
    (constexprs: without masks the kernels compile as they did before masks; ``dummy`` fills the
    unused pointer). A window wider than ``T_q + T_k`` hides nothing: it is clamped there (int32)."""
    docs = dummy if segment_ids is None else document_bounds(segment_ids)
    width = 0 if window is None else min(int(window), t_q + t_k)
    return (docs, width), {"HAS_WINDOW": window is not None, "HAS_DOCS": segment_ids is not None}


def _fwd_flash(q, k, v, out, lse, causal, scale, alibi_slopes, masks):
    b, h, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    kernel, extra = _tuned_kernel("fwd", _attn_fwd_kernel, block_d, q.element_size())
    slopes = alibi_slopes if alibi_slopes is not None else lse  # dummy pointer when unused
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    wrap(kernel)[grid](
        q,
        k,
        v,
        out,
        lse,
        slopes,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        h,
        h // h_kv,
        t_q,
        t_k,
        scale * _LOG2E,
        _bucket(t_q),
        _bucket(t_k),
        *masks[0],
        HEAD_DIM=d,
        CAUSAL=causal,
        HAS_ALIBI=alibi_slopes is not None,
        EVEN_D=(d == block_d),
        BLOCK_D=block_d,
        DOT_PREC=_dot_prec(q.dtype),
        NEG_SCALE=scale < 0,
        **masks[1],
        **extra,
    )


def _decode_launch(block_d: int, elem_size: int, rows: int) -> dict:
    """Launch kwargs of the split-KV kernel: its config (:data:`CONFIGS` "decode", pinnable) with
    BLOCK_M raised to the power of two that holds ``rows`` (the GQA group's heads x T_q)."""
    launch = _fixed_launch("decode", block_d, elem_size) or _launch_kwargs(configs("decode", block_d, elem_size)[0])
    launch["BLOCK_M"] = max(launch["BLOCK_M"], triton.next_power_of_2(rows))
    return launch


def _fwd_split_kv(q, k, v, out, lse, causal, scale, alibi_slopes, masks):
    b, h, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h // h_kv
    block_d = _block_d(d)
    launch = _decode_launch(block_d, q.element_size(), group * t_q)
    part_m, block_n = launch["BLOCK_M"], launch["BLOCK_N"]
    interp = interpreting()
    min_chunk = _INTERP_DECODE_MIN_CHUNK if interp else 256
    target = 2 * _num_sms(q.device)  # enough programs to fill the GPU twice over
    # the keys to split: all, or with a window at most the rows' union (the last T_q - 1 + window
    # keys) from the tile it starts in
    span = t_k if not masks[1]["HAS_WINDOW"] else min(t_k, masks[0][1] + t_q - 1 + block_n - 1)
    n_splits = max(1, min(triton.cdiv(target, b * h_kv), triton.cdiv(span, min_chunk), 128))
    chunk = triton.cdiv(triton.cdiv(span, n_splits), block_n) * block_n
    n_splits = triton.cdiv(span, chunk)
    o_part = torch.empty((b * h_kv * n_splits * part_m * block_d,), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((b * h_kv * n_splits * part_m,), device=q.device, dtype=torch.float32)
    slopes = alibi_slopes if alibi_slopes is not None else lse_part
    wrap(jit(_attn_decode_kernel))[(b * h_kv, n_splits)](
        q,
        k,
        v,
        o_part,
        lse_part,
        slopes,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        h_kv,
        group,
        t_q,
        t_k,
        scale * _LOG2E,
        chunk,
        n_splits,
        *masks[0],
        HEAD_DIM=d,
        CAUSAL=causal,
        HAS_ALIBI=alibi_slopes is not None,
        BLOCK_D=block_d,
        DOT_PREC=_dot_prec(q.dtype),
        **masks[1],
        **launch,
    )
    extra = {} if interp else {"num_warps": 4 if block_d >= 128 else 2}
    wrap(jit(_attn_decode_combine_kernel))[(b * h_kv * group * t_q,)](
        o_part,
        lse_part,
        out,
        lse,
        *_strides(out),
        h_kv,
        group,
        t_q,
        n_splits,
        HEAD_DIM=d,
        PART_M=part_m,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
        BLOCK_D=block_d,
        **extra,
    )


def _check_supported(q: Tensor):
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"triton attention: head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton attention: dtype {q.dtype} not supported (float16/bfloat16/float32)")


def _forward(q, k, v, causal, scale, alibi_slopes, window, segment_ids, split_kv=None):
    """The forward launch -> ``(out, lse2)``, ``lse2`` in log2 units (what the kernels keep: the
    backward reads it as written, so a row with one visible key recomputes P = 1 exactly; a round
    trip through natural units costs that row's dQ a few ulps where PyTorch's is exactly 0)."""
    _check_supported(q)
    b, h, t_q, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, h, t_q), device=q.device, dtype=torch.float32)
    if is_traced(q, k, v) and interpreting():
        return out, lse  # shapes only: the interpreter cannot run on fake tensors
    if split_kv is None:
        split_kv = use_split_kv(t_q, k.shape[2], h // k.shape[1])
    masks = _mask_args(window, segment_ids, t_q, k.shape[2], lse)
    if split_kv:
        _fwd_split_kv(q, k, v, out, lse, causal, scale, alibi_slopes, masks)
    else:
        _fwd_flash(q, k, v, out, lse, causal, scale, alibi_slopes, masks)
    return out, lse


def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                      alibi_slopes: Optional[Tensor] = None, window: Optional[int] = None,
                      segment_ids: Optional[Tensor] = None, split_kv: Optional[bool] = None
                      ) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """Launch the forward; returns ``(out, lse)``. ``out`` has q's layout (``empty_like``), ``lse``
    is ``(B, H, T_q)`` float32 (natural log, ``-inf`` for a row that sees no key). ``window`` and
    ``segment_ids`` as in :func:`fastlm.ops.attention` (unchecked here). ``split_kv=None`` picks the
    decode path by :func:`use_split_kv`."""
    out, lse2 = _forward(q, k, v, causal, scale, alibi_slopes, window, segment_ids, split_kv)
    return out, lse2 * _LN2


def attention_decode(q, k, v, causal, scale, alibi_slopes=None, window=None, segment_ids=None):
    """The split-KV (flash-decoding) forward regardless of shape; returns ``(out, lse)``."""
    return attention_forward(q, k, v, causal, scale, alibi_slopes, window, segment_ids, split_kv=True)


def _bwd_preprocess(out, dout, delta, block_d):
    """Delta = rowsum(dO * O) (FlashAttention-2's), for float16 / bfloat16."""
    b, h, t_q, d = out.shape
    block_m = 32 if interpreting() else 64
    extra = {} if interpreting() else {"num_warps": 4}
    wrap(jit(_attn_bwd_preprocess_kernel))[(triton.cdiv(t_q, block_m) * b * h,)](
        out, dout, delta, *_strides(out), *_strides(dout), h, t_q, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, **extra
    )


def _dq_pass(q, k, v, dout, lse, delta, dq, slopes, scale, common, masks, delta_only):
    """The dQ kernel; with ``delta_only`` it writes Delta = rowsum(P * dP) of the recomputed P
    instead (the float32 path: the exact softmax derivative, free of O's rounding, which rowsum(dO * O)
    carries into dQ and dK: up to 2.9x SDPA's float32 error against the float64 oracle)."""
    b, h, t_q, _ = q.shape
    t_k = k.shape[2]
    kernel, extra = _tuned_kernel("dq", _attn_bwd_dq_kernel, common["BLOCK_D"], q.element_size())
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]) * b * h,)  # noqa: E731
    wrap(kernel)[grid](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        slopes,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        *_strides(dq),
        h,
        h // k.shape[1],
        t_q,
        t_k,
        scale * _LOG2E,
        scale,
        _bucket(t_q),
        _bucket(t_k),
        *masks,
        DELTA_ONLY=delta_only,
        **common,
        **extra,
    )


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       causal: bool, scale: float, alibi_slopes: Optional[Tensor] = None,
                       window: Optional[int] = None, segment_ids: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Launch the backward (``lse`` natural, as :func:`attention_forward` returns it); returns fresh
    ``(dq, dk, dv)`` in the layouts of q, k, v (the forward's masks again: rows that saw no key get
    zero gradients)."""
    return _backward(dout, q, k, v, out, lse * _LOG2E, causal, scale, alibi_slopes, window, segment_ids)


def _backward(dout, q, k, v, out, lse, causal, scale, alibi_slopes, window, segment_ids):
    """The backward launch; ``lse`` in log2 units (:func:`_forward`'s)."""
    _check_supported(q)
    b, h, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h // h_kv
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if is_traced(q, k, v, dout) and interpreting():
        return dq, dk, dv
    delta = torch.empty((b, h, t_q), device=q.device, dtype=torch.float32)
    block_d = _block_d(d)
    slopes = alibi_slopes if alibi_slopes is not None else delta
    masks, switches = _mask_args(window, segment_ids, t_q, t_k, delta)
    common = dict(
        HEAD_DIM=d,
        CAUSAL=causal,
        HAS_ALIBI=alibi_slopes is not None,
        EVEN_D=(d == block_d),
        BLOCK_D=block_d,
        DOT_PREC=_dot_prec(q.dtype),
        **switches,
    )
    dq_args = (q, k, v, dout, lse, delta, dq, slopes, scale, common, masks)
    if q.dtype == torch.float32:
        _dq_pass(*dq_args, delta_only=True)
    else:
        _bwd_preprocess(out, dout, delta, block_d)
    dkdv, extra = _tuned_kernel(
        "dkdv", _attn_bwd_dkdv_kernel, block_d, q.element_size(), masked=window is not None or segment_ids is not None
    )
    grid = lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]) * b * h_kv,)  # noqa: E731
    wrap(dkdv)[grid](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        slopes,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        *_strides(dk),
        *_strides(dv),
        h,
        group,
        t_q,
        t_k,
        scale * _LOG2E,
        scale,
        _bucket(t_q),
        _bucket(t_k),
        *masks,
        **common,
        **extra,
    )
    _dq_pass(*dq_args, delta_only=False)
    return dq, dk, dv


# =================================================================================================
# torch.library ops + autograd
# =================================================================================================
# The ops' LSE is in log2 units (:func:`_forward`): the forward op's second output goes to the
# backward op as it is.
@torch.library.triton_op("fastlm::triton_attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    alibi_slopes: Optional[Tensor],
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return _forward(q, k, v, causal, scale, alibi_slopes, window, segment_ids)


@torch.library.triton_op("fastlm::triton_attention_bwd", mutates_args=())
def _attention_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      causal: bool, scale: float, alibi_slopes: Optional[Tensor], window: Optional[int] = None,
                      segment_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _backward(dout, q, k, v, out, lse, causal, scale, alibi_slopes, window, segment_ids)


register_attention_autograd(_attention_fwd_op, _attention_bwd_op)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable fused attention (no input validation: use :func:`fastlm.ops.attention`, which
    also states the masks' rule)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float().contiguous()
    window = None if window is None else int(window)
    return _attention_fwd_op(q, k, v, bool(causal), float(scale), alibi_slopes, window, segment_ids)[0]

"""Shared by the attention kernel tests: the LSE baseline of the 2x rule.

The kernels (Triton and CUDA) keep softmax statistics in log2 units: scores ``t = qk * scale *
log2(e)`` (+ ALiBi bias * log2(e)), ``lse = (max t + log2(sum 2^(t - max t))) * ln 2``. The LSE is a
float32 statistic whatever the input dtype, so its "same dtype" baseline is this formula run by plain
PyTorch in float32 on the inputs as given (the natural-log formula would skip two roundings that no
base-2 kernel can, with a power-of-two ``scale`` the baseline is then unusually exact).
"""

import math

import torch

from fastlm.ops.reference import alibi_bias, causal_mask


def lse_base2_fp32(q, k, causal: bool, scale: float, slopes=None):
    """``(B, H, T_q)`` float32 LSE of q ``(B, H, T_q, D)`` against k ``(B, H_kv, T_k, D)``; ``-inf``
    for rows that see no key (bottom-right causal alignment)."""
    q, k = q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    log2e = torch.tensor(math.log2(math.e), dtype=torch.float32)
    t = q @ k.transpose(-2, -1) * (torch.tensor(scale, dtype=torch.float32) * log2e)
    if slopes is not None:
        t = t + alibi_bias(slopes.float() * log2e, q.shape[2], k.shape[2])
    if causal:
        t = t.masked_fill(~causal_mask(q.shape[2], k.shape[2], device=q.device), float("-inf"))
    m = t.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    return (m + torch.exp2(t - m).sum(-1, keepdim=True).log2()).squeeze(-1) * math.log(2)

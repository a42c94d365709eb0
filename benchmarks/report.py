"""Turn ``benchmarks/results.jsonl`` into ``benchmarks/REPORT.md`` and ``benchmarks/plots/*.png``.

    python -m benchmarks.report [--device H100] [--all-commits] [--summary] [--no-plots]

Rows are grouped per device and git commit. For each device the newest commit's group is reported
(``--all-commits``: every group, newest first); inside a group each benchmark keeps its newest row,
so a partial rerun replaces only what it measured. Tables: attention TFLOP/s per backend and shape
with the speed-up over SDPA's default dispatch, SwiGLU GB/s vs eager, the model's training tokens/s
(and MFU, peak memory on CUDA), generation tokens/s cached vs uncached, and the CPU speedrun's
recipes (``benchmarks.speedrun`` rows of every commit: loss mean ± std over seeds, wall, MFU).
Plots: attention TFLOP/s vs sequence length, one PNG per (device, dtype, head dim, causal), a panel per pass.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

BENCH_DIR = Path(__file__).resolve().parent
PASS_ORDER = ("fwd+bwd", "fwd", "bwd")
ATTN_BACKEND_ORDER = (
    "auto",
    "triton",
    "cuda",
    "cpp",
    "torch",
    "reference",
    "sdpa",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "sdpa-math",
)
SWIGLU_BACKEND_ORDER = ("auto", "triton", "cuda", "cpp", "torch", "reference", "eager", "compile")


# ---- loading and grouping -----------------------------------------------------------------------
def load_rows(path: Path) -> tuple[list, int]:
    """Parsed rows of a JSON-lines file and the number of lines that could not be used."""
    rows, bad = [], 0
    if not path.exists():
        return rows, bad
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict) or not {"device", "suite", "backend"} <= set(row):
                bad += 1
                continue
            rows.append(row)
    return rows, bad


def ms(row: dict) -> Optional[float]:
    """The row's headline time (median on CUDA, best round on CPU; older rows: the median)."""
    return row.get("ms") or row.get("median_ms")


def bench_key(row: dict) -> tuple:
    return (
        row.get("suite"),
        row.get("op"),
        row.get("pass"),
        row.get("backend"),
        row.get("dtype"),
        json.dumps(row.get("shape") or {}, sort_keys=True),
        row.get("causal"),
        row.get("variant"),
    )


def _stamp(row: dict) -> tuple:
    return (row.get("date") or "", row.get("run_id") or "")


def select(rows: Iterable[dict], device: Optional[str] = None, all_commits: bool = False) -> list:
    """``[(device, commit, rows)]``: per device its newest commit group (or all), deduplicated."""
    groups = defaultdict(list)
    for row in rows:
        if device and device.lower() not in str(row["device"]).lower():
            continue
        groups[(row["device"], row.get("commit") or "unknown")].append(row)
    newest = {}
    for key, grp in groups.items():
        latest = {}
        for row in sorted(grp, key=_stamp):
            latest[bench_key(row)] = row
        newest[key] = list(latest.values())
    by_device = defaultdict(list)
    for (dev, commit), grp in newest.items():
        by_device[dev].append((max(_stamp(r) for r in grp), commit, grp))
    out = []
    for dev in sorted(by_device):
        ordered = sorted(by_device[dev], key=lambda t: t[0], reverse=True)
        for _, commit, grp in ordered if all_commits else ordered[:1]:
            out.append((dev, commit, grp))
    return out


# ---- formatting ---------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _order(names, preferred) -> list:
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def attn_shape_label(row: dict) -> str:
    s = row.get("shape") or {}
    kv = f" kv{s['H_kv']}" if s.get("H_kv") not in (None, s.get("H")) else ""
    t = s.get("T_q") if s.get("T_q") == s.get("T_k") else f"{s.get('T_q')}x{s.get('T_k')}"
    variant = row.get("variant")
    tail = "" if variant in (None, "dense") else f" {variant}"
    return f"B{s.get('B')} H{s.get('H')}{kv} T{t} D{s.get('D')}{' causal' if row.get('causal') else ''}{tail}"


def _attn_sort_key(row: dict):
    s = row.get("shape") or {}
    return (row.get("variant") != "dense", s.get("D", 0), not row.get("causal"), s.get("T_q", 0), s.get("H_kv", 0))


def _backend_label(row: dict) -> str:
    b = row.get("backend")
    if b == "auto" and row.get("resolved") and row["resolved"] != "auto":
        return f"auto ({row['resolved']})"
    return b


# ---- sections -----------------------------------------------------------------------------------
OWN_KERNELS = ("triton", "cuda", "cpp")
SHORT_ATTN_COLUMNS = ("auto", "triton", "cuda", "cpp", "reference", "sdpa", "sdpa-flash", "sdpa-cudnn")


def _flops_unit(rows: list) -> tuple:
    """(label, scale): GFLOP/s for CPU rows (TFLOP/s would print as 0.00x), else TFLOP/s."""
    if rows and all(r.get("device_type") == "cpu" for r in rows):
        return "GFLOP/s", 1e3
    return "TFLOP/s", 1.0


def _speedup(base: Optional[dict], row: Optional[dict]) -> str:
    if not base or not row:
        return "n/a"
    return f"{ms(base) / ms(row):.2f}x"


def attention_section(rows: list, details: bool = True, columns: Optional[tuple] = None) -> list:
    attn = [r for r in rows if r.get("suite") == "attention" and ms(r)]
    if not attn:
        return []
    unit, scale = _flops_unit(attn)
    out = [
        "### Attention",
        "",
        f"{unit} by FlashAttention's count (forward 4·B·H·T²·D, halved when causal; backward 2.5x "
        "forward). `sdpa` is `F.scaled_dot_product_attention`'s own dispatch, `sdpa-*` one kernel "
        "named with `torch.nn.attention.sdpa_kernel`; `auto`, `torch`, `reference`, `triton`, `cuda`, "
        "`cpp` are `fastlm.ops.attention` backends. Speed-up = `sdpa` time / backend time (same "
        'shape and pass); "best kernel" is the fastest of fastlm\'s own kernels (triton, cuda, cpp).',
        "",
    ]
    for dtype in sorted({r.get("dtype") for r in attn}):
        for pass_ in _order({r.get("pass") for r in attn if r.get("dtype") == dtype}, PASS_ORDER):
            sel = [r for r in attn if r.get("dtype") == dtype and r.get("pass") == pass_]
            backends = _order({r["backend"] for r in sel}, ATTN_BACKEND_ORDER)
            if columns is not None:
                backends = [b for b in backends if b in columns]
            shapes = {}
            for r in sorted(sel, key=_attn_sort_key):
                shapes.setdefault(attn_shape_label(r), {})[r["backend"]] = r
            autos = sorted({str(r.get("resolved")) for r in sel if r["backend"] == "auto" and r.get("resolved")})
            picked = f" (auto picked: {', '.join(autos)})" if autos else ""
            out += [f"**{pass_}, {dtype}: {unit}**{picked}", ""]
            body = []
            for label, by_backend in shapes.items():
                cells = [fmt(by_backend[b]["tflops"] * scale) if b in by_backend else "–" for b in backends]
                sdpa = by_backend.get("sdpa")
                own = [r for b, r in by_backend.items() if b in OWN_KERNELS]
                best = min(own, key=ms) if own else None
                best_s = f"{_speedup(sdpa, best)} ({best['backend']})" if sdpa and best else "n/a"
                body.append([label] + cells + [_speedup(sdpa, by_backend.get("auto")), best_s])
            out += [table(["shape"] + backends + ["auto vs sdpa", "best kernel vs sdpa"], body), ""]
            if details:
                long_rows = []
                for label, by_backend in shapes.items():
                    sdpa = by_backend.get("sdpa")
                    for b in backends:
                        if b in by_backend:
                            r = by_backend[b]
                            long_rows.append(
                                [label, _backend_label(r), fmt(ms(r)), fmt(r["tflops"] * scale), _speedup(sdpa, r)]
                            )
                out += [
                    f"<details><summary>{pass_}, {dtype}: ms per backend</summary>",
                    "",
                    table(["shape", "backend", "ms", unit, "speed-up vs sdpa"], long_rows),
                    "",
                    "</details>",
                    "",
                ]
    return out


def swiglu_section(rows: list) -> list:
    sw = [r for r in rows if r.get("suite") == "swiglu" and ms(r)]
    if not sw:
        return []
    out = [
        "### SwiGLU",
        "",
        "GB/s = bytes a fused kernel must move (forward: read gate, up, write out; backward: read "
        "gate, up, dout, write dgate, dup) / time. `eager` is `F.silu(g) * u`, `compile` its "
        "`torch.compile`. `packed` rows are `swiglu_packed` on one `[rows, 2·cols]` tensor "
        "(the model's layout; eager = `chunk` + `F.silu(g) * u`).",
        "",
    ]
    body = []
    groups = defaultdict(dict)
    for r in sw:
        s = r.get("shape") or {}
        op = r.get("op") or "swiglu"
        label = (
            f"packed {s.get('rows')}x2·{s.get('cols')}" if op == "swiglu_packed" else f"{s.get('rows')}x{s.get('cols')}"
        )
        groups[(label, r.get("dtype"), r.get("pass"))][r["backend"]] = r
    for (shape, dtype, pass_), by_backend in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], PASS_ORDER.index(kv[0][2]) if kv[0][2] in PASS_ORDER else 9)
    ):
        eager = by_backend.get("eager")
        for b in _order(by_backend, SWIGLU_BACKEND_ORDER):
            r = by_backend[b]
            sp = f"{ms(eager) / ms(r):.2f}x" if eager else "n/a"
            note = f"compile {r['compile_s']} s" if r.get("compile_s") is not None else ""
            body.append([shape, dtype, pass_, _backend_label(r), fmt(ms(r)), fmt(r["gbps"]), sp, note])
    return out + [table(["shape", "dtype", "pass", "backend", "ms", "GB/s", "vs eager", "note"], body), ""]


def _fused_vs_composed(rows: list, suite: str, intro: list, shape_keys: tuple, shape_header: str) -> list:
    """A section comparing a fused op (``cpp``) with its composed form (``torch``) per shape, variant and
    pass: the ``intro`` lines, then the table (empty without rows of ``suite``)."""
    picked = [r for r in rows if r.get("suite") == suite and ms(r)]
    if not picked:
        return []
    groups = defaultdict(dict)
    for r in picked:
        s = r.get("shape") or {}
        shape = "x".join(str(s.get(k)) for k in shape_keys)
        groups[(shape, r.get("variant"), r.get("pass"))][r["backend"]] = r
    body = []
    for (shape, variant, pass_), by_backend in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], PASS_ORDER.index(kv[0][2]) if kv[0][2] in PASS_ORDER else 9)
    ):
        composed = by_backend.get("torch")
        for b in _order(by_backend, ("cpp", "torch")):
            r = by_backend[b]
            body.append([shape, variant, pass_, b, fmt(ms(r)), _speedup(composed, r)])
    return intro + [table([shape_header, "variant", "pass", "backend", "ms", "vs composed"], body), ""]


def qk_norm_section(rows: list) -> list:
    intro = [
        "### QK-norm and value-embedding mix",
        "",
        "`ops.qk_norm_value_mix` on the packed qkv (the default model's step before attention): `cpp` is "
        "the fused C++ op, `torch` the composed form (split, `F.layer_norm` per head view, mix, "
        "concatenation: what the model ran before the op). `bf16->fp32`: a bfloat16 qkv written out "
        "as float32 (the CPU autocast step).",
        "",
    ]
    return _fused_vs_composed(rows, "qk_norm", intro, ("batch", "block", "n_head", "head_dim"), "B x T x H x D")


def layer_norm_section(rows: list) -> list:
    intro = [
        "### Pre-norms (residual add + LayerNorm)",
        "",
        "`ops.layer_norm` (the default model's pre-norms): `cpp` is the fused C++ op, `torch` the composed "
        "form (`x + residual`, `F.layer_norm`, the cast: what the model ran before the op). "
        "`fp32+bf16->bf16`: the float32 residual stream plus a bfloat16 branch output, normalised and "
        "written in bfloat16 (the CPU autocast step).",
        "",
    ]
    return _fused_vs_composed(rows, "layer_norm", intro, ("batch", "block", "n_embd"), "B x T x C")


def attention_qkv_section(rows: list) -> list:
    aq = [r for r in rows if r.get("suite") == "attention_qkv" and ms(r)]
    if not aq:
        return []
    out = [
        "### Fused qkv attention",
        "",
        "`ops.attention_qkv` at the default CPU run's shape (the model's attention on its packed qkv, RoPE "
        "inside): `cpp` is the fused C++ op, `torch` the composed form on SDPA. `bf16`: a bfloat16 qkv (the "
        "CPU autocast step), which the fused op computes with bf16 products and float32 sums on a CPU with "
        "AVX512-BF16; `bf16 via fp32`: the fused op on the float32 upcast (before the bf16 products). "
        "`vs fp32 route`: against the `bf16 via fp32` row of the same pass.",
        "",
    ]
    groups = defaultdict(dict)
    for r in aq:
        s = r.get("shape") or {}
        shape = "x".join(str(s.get(k)) for k in ("batch", "block", "n_head", "head_dim"))
        groups[(shape, r.get("pass"))][(r.get("variant"), r["backend"])] = r
    body = []
    for (shape, pass_), cells in sorted(
        groups.items(), key=lambda kv: (kv[0][0], PASS_ORDER.index(kv[0][1]) if kv[0][1] in PASS_ORDER else 9)
    ):
        route = cells.get(("bf16 via fp32", "cpp"))
        for variant in ("fp32", "bf16", "bf16 via fp32"):
            composed = cells.get((variant, "torch")) or cells.get(("bf16", "torch"))
            for b in ("cpp", "torch"):
                r = cells.get((variant, b))
                if r is None:
                    continue
                vs_route = _speedup(route, r) if variant == "bf16" and b == "cpp" else "-"
                body.append([shape, pass_, variant, b, fmt(ms(r)), _speedup(composed, r), vs_route])
    return out + [
        table(["B x T x H x D", "pass", "variant", "backend", "ms", "vs composed", "vs fp32 route"], body),
        "",
    ]


def model_section(rows: list) -> list:
    md = [r for r in rows if r.get("suite") == "model" and ms(r) and str(r.get("op")).startswith("train_step-")]
    if not md:
        return []
    out = [
        "### Model training step",
        "",
        "One optimizer step (forward, backward, AdamW). MFU = model FLOPs (6N + 12·L·H·D·T per token) x "
        "tokens / time / peak (CUDA: dense bf16; CPU: threads x the one-thread fp32 GEMM rate for these float32 "
        "steps, the one-thread bf16 GEMM rate for `default-cpu-precision`: the default run's bf16-autocast step "
        "as the Trainer takes it, Muon and clipping included). "
        "`torch` = SDPA + eager MLP.",
        "",
    ]
    body = []
    groups = defaultdict(dict)
    for r in md:
        groups[(r.get("op"), r.get("variant"), r.get("dtype"))][r["backend"]] = r
    for (op, mlp, dtype), by_backend in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        base = by_backend.get("torch")
        for b in _order(by_backend, ("auto", "torch", "reference")):
            r = by_backend[b]
            s = r.get("shape") or {}
            shape = f"{s.get('n_layer')}x{s.get('n_embd')}, T{s.get('block')}, B{s.get('batch')}"
            cfg = f"{op.replace('train_step-', '')} ({shape})"
            sp = f"{ms(base) / ms(r):.2f}x" if base else "n/a"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            mem = fmt(r.get("peak_mem_mb")) if r.get("peak_mem_mb") is not None else "n/a"
            body.append([cfg, mlp, dtype, _backend_label(r), fmt(ms(r)), fmt(r.get("tokens_per_s")), mfu, mem, sp])
    return out + [
        table(["config", "mlp", "dtype", "backend", "ms/step", "tokens/s", "MFU", "peak MiB", "vs torch"], body),
        "",
    ]


def optimizer_section(rows: list) -> list:
    """``optimizer.step()`` alone and its share of the training step it belongs to (one row each)."""
    rs = [
        r
        for r in rows
        if r.get("suite") == "model"
        and str(r.get("op")).startswith("optimizer_step-")
        and r.get("step_fraction") is not None
    ]
    if not rs:
        return []
    out = [
        "### Optimizer step",
        "",
        "`optimizer.step()` alone on the default model's gradients (best and median of its rounds) and "
        "the whole training step with that optimizer, timed right after in the same test; share = "
        "step / training step (the best round of each on CPU). `muon` is the step as training runs it, "
        "`muon-pytorch` the same optimizer forced to its PyTorch form (`fused=False`), `muon-bf16` the fused "
        "step with bf16 Newton-Schulz products (what a CPU bfloat16 run takes).",
        "",
    ]
    body = []
    for r in rs:
        s = r.get("shape") or {}
        cfg = f"{r['op'].replace('optimizer_step-', '')} ({s.get('n_layer')}x{s.get('n_embd')})"
        body.append(
            [
                cfg,
                r.get("variant"),
                fmt(r.get("min_ms")),
                fmt(r.get("median_ms")),
                fmt(r.get("train_step_ms")),
                f"{100 * r['step_fraction']:.1f}%",
            ]
        )
    return out + [
        table(["config", "optimizer", "step ms (best)", "step ms (median)", "training step ms", "share"], body),
        "",
    ]


def default_step_section(rows: list) -> list:
    """The default training step, fastlm vs plain PyTorch, timed in alternating rounds (one row each)."""
    ds = [
        r
        for r in rows
        if r.get("suite") == "model"
        and str(r.get("op")).startswith("default_step-")
        and r.get("speedup_median") is not None
    ]
    if not ds:
        return []
    out = [
        "### Default training step vs plain PyTorch",
        "",
        "The whole step (forward, backward, optimizer) as `python -m fastlm.train` runs it: fastlm kernels "
        "(`auto`) and fastlm's optimizer, against the same model and optimizer on SDPA + eager MLP + "
        "torch.optim (`torch.optim.Muon` + AdamW for `muon`). Both timed in alternating rounds in one "
        "test; speed-up = plain / fastlm; MFU = fastlm's best step against the peak (as above).",
        "",
    ]
    body = []
    for r in ds:
        s = r.get("shape") or {}
        shape = f"{s.get('n_layer')}x{s.get('n_embd')}, T{s.get('block')}, B{s.get('batch')}"
        cfg = f"{r['op'].replace('default_step-', '')} ({shape})"
        body.append(
            [
                cfg,
                r.get("variant"),
                _backend_label(r),
                fmt(r["fastlm_median_ms"]),
                fmt(r["plain_median_ms"]),
                f"{r['speedup_median']:.2f}x",
                fmt(r["fastlm_min_ms"]),
                fmt(r["plain_min_ms"]),
                f"{r['speedup_min']:.2f}x",
                f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
            ]
        )
    return out + [
        table(
            [
                "config",
                "optimizer",
                "fastlm",
                "fastlm ms (median)",
                "plain ms (median)",
                "speed-up",
                "fastlm ms (best)",
                "plain ms (best)",
                "speed-up (best)",
                "MFU",
            ],
            body,
        ),
        "",
    ]


def masks_section(rows: list) -> list:
    """Masked attention (benchmarks/test_bench_masks.py): per case, fastlm's skipping kernel against SDPA
    with the dense mask and against its own dense causal call (the cost without skipping)."""
    ms_rows = [r for r in rows if r.get("suite") == "attention_masks" and ms(r)]
    if not ms_rows:
        return []
    cases = {}
    for r in ms_rows:
        s = r.get("shape") or {}
        cases.setdefault((s.get("T_q"), r.get("variant"), r.get("dtype")), {})[r["backend"]] = r
    body = []
    for (t, variant, dtype), by in sorted(cases.items(), key=lambda kv: (str(kv[0][2]), kv[0][0], str(kv[0][1]))):
        kernel = next((b for b in ("triton", "cuda", "cpp") if b in by), None)
        if kernel is None:
            continue
        k, dense, sdpa, flex = by[kernel], by.get(f"{kernel}-dense"), by.get("torch"), by.get("flex")
        body.append(
            [
                f"T{t} {variant}",
                dtype,
                kernel,
                fmt(ms(k)),
                fmt(ms(sdpa)) if sdpa else "-",
                f"{ms(sdpa) / ms(k):.2f}x" if sdpa else "-",
                fmt(ms(dense)) if dense else "-",
                f"{ms(dense) / ms(k):.2f}x" if dense else "-",
                fmt(ms(flex)) if flex else "-",
            ]
        )
    if not body:
        return []
    return [
        "### Masked attention",
        "",
        "Forward+backward, B=2 H=4 D=64, causal, with a sliding window (`w`) or documents of random lengths "
        "(`docs`). `SDPA dense mask`: `F.scaled_dot_product_attention` given the equivalent boolean mask; "
        "`dense causal`: the same fastlm kernel without the mask (every causal tile computed); FlexAttention: "
        "its forward only (no CPU backward).",
        "",
        table(
            [
                "case",
                "dtype",
                "kernel",
                "kernel ms",
                "SDPA dense mask ms",
                "vs SDPA",
                "dense causal ms",
                "vs dense",
                "FlexAttention fwd ms",
            ],
            body,
        ),
        "",
    ]


def generate_section(rows: list) -> list:
    gen = [r for r in rows if r.get("suite") == "generate" and ms(r)]
    if not gen:
        return []
    out = [
        "### Generation (greedy)",
        "",
        "tokens/s = batch x new tokens / wall time (prefill included); cached = KV cache, uncached = "
        "the whole sequence re-fed every step.",
        "",
    ]
    groups = defaultdict(dict)
    for r in gen:
        s = r.get("shape") or {}
        key = (r.get("op"), r.get("dtype"), r.get("backend"), s.get("batch"), s.get("prompt"), s.get("new_tokens"))
        groups[key][r.get("variant")] = r
    body = []
    for (op, dtype, backend, batch, prompt, new), v in sorted(
        groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])
    ):
        c, u = v.get("cached"), v.get("uncached")
        sp = f"{ms(u) / ms(c):.2f}x" if c and u else "n/a"
        body.append(
            [
                op.replace("generate-", ""),
                dtype,
                backend,
                batch,
                f"{prompt} + {new}",
                fmt(c.get("tokens_per_s")) if c else "n/a",
                fmt(u.get("tokens_per_s")) if u else "n/a",
                sp,
            ]
        )
    return out + [
        table(
            ["model", "dtype", "backend", "batch", "prompt + new", "cached tok/s", "uncached tok/s", "cached speed-up"],
            body,
        ),
        "",
    ]


def _pm(row: dict, key: str, digits: str, scale: float = 1.0) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "n/a"
    return format(mean * scale, digits) + (f" ± {format(std * scale, digits)}" if std is not None else "")


_BASES = ("default", "plain")  # listed first in each group


def speedrun_section(rows: list) -> list:
    """``python -m benchmarks.speedrun`` rows of every commit: per device and corpus the newest row of
    each recipe, with its whole-val loss against the plain recipe's, else the default's (same device,
    corpus and thread count: the ablations are options on the plain model)."""
    latest = {}
    for r in sorted(
        (r for r in rows if r.get("suite") == "speedrun" and r.get("val_loss_mean") is not None), key=_stamp
    ):
        latest[(r["device"], r.get("variant"), r.get("threads"), r.get("op"))] = r
    if not latest:
        return []
    out = [
        "## CPU speedrun",
        "",
        "`python -m benchmarks.speedrun`: each recipe trained with several seeds (mean ± sample std over "
        "them). Whole-val = the best checkpoint's loss over the whole validation split (nats/token); "
        "Δ = recipe - the plain recipe (else the default) on the same corpus and threads; step time = "
        "the recipe's step over the first recipe's (`--equal-wall`: timed in alternating runs, median over "
        "rounds), which set its steps to the first recipe's wall time (CPU time per step, see "
        "benchmarks/speedrun.py); MFU = model FLOPs "
        "(6N + 12·L·H·D·T per token) / train wall / the peak the run reports (CPU: threads x the one-thread "
        "GEMM rate in the run's dtype, fp32 or bf16); dtype = the run's autocast dtype; MFU (CPU time) = "
        "the same over the training loop's CPU seconds (what the run "
        "reaches alone on the machine with one thread); load = 1-minute load average during the runs.",
        "",
    ]
    body = []
    for (dev, corpus, threads, op), r in sorted(
        latest.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]), kv[0][3] not in _BASES, str(kv[0][3]))
    ):
        base = latest.get((dev, corpus, threads, "plain"), latest.get((dev, corpus, threads, "default")))
        delta = f"{r['val_loss_mean'] - base['val_loss_mean']:+.4f}" if base is not None and base is not r else ""
        ratio = (r.get("step_ratio") or {}).get("ratio")
        body.append(
            [
                dev,
                corpus,
                op,
                # rows before the runs recorded their resolved dtype say "auto": float32 on CPU then
                "float32" if r.get("dtype") in (None, "auto") else r["dtype"],
                r.get("steps"),
                len(r.get("seeds") or []),
                _pm(r, "val_loss", ".4f"),
                delta,
                f"{ratio:.3f}" if ratio is not None else "",
                _pm(r, "train_wall_s", ".0f"),
                fmt(r.get("tokens_seen_mean")),
                fmt(r.get("flops_mean")),
                _pm(r, "mfu", ".1f", 100),
                _pm(r, "mfu_cpu", ".1f", 100),
                _pm(r, "load_1min", ".1f"),
                r.get("threads"),
                r.get("commit"),
            ]
        )
    return out + [
        table(
            [
                "device",
                "corpus",
                "recipe",
                "dtype",
                "steps",
                "seeds",
                "whole-val",
                "Δ vs plain",
                "step time",
                "train wall s",
                "tokens",
                "FLOPs",
                "MFU %",
                "MFU (CPU time) %",
                "load",
                "threads",
                "commit",
            ],
            body,
        ),
        "",
    ]


def device_header(dev: str, commit: str, rows: list) -> list:
    r0 = max(rows, key=_stamp)
    dates = sorted(r.get("date") or "" for r in rows)
    dirty = " (uncommitted changes)" if any(r.get("dirty") for r in rows) else ""
    bits = [f"commit `{commit}`{dirty}", f"torch {r0.get('torch')}"]
    if r0.get("triton"):
        bits.append(f"triton {r0.get('triton')}")
    if r0.get("cuda"):
        bits.append(f"CUDA {r0.get('cuda')}")
    if r0.get("device_type") == "cpu":
        bits.append(f"{r0.get('threads')} threads")
    bits.append(f"measured {dates[0][:16]} – {dates[-1][:16]} UTC, {len(rows)} rows")
    note = []
    if r0.get("device_type") == "cpu":
        note = [
            "",
            "_CPU rows are indicative only: the machine was shared with other jobs while measuring. "
            "Times are the best round (medians are in results.jsonl); on CUDA they are medians._",
        ]
    return [f"## {dev}", "", "; ".join(bits) + "."] + note + [""]


# ---- plots --------------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def attention_plots(dev: str, rows: list, plot_dir: Path, suffix: str = "") -> list:
    """One PNG per (dtype, D, causal) of the dense attention rows; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attn = [r for r in rows if r.get("suite") == "attention" and r.get("variant") == "dense" and r.get("tflops")]
    groups = defaultdict(list)
    for r in attn:
        s = r.get("shape") or {}
        groups[(r.get("dtype"), s.get("D"), bool(r.get("causal")))].append(r)
    written = []
    for (dtype, d, causal), grp in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        passes = _order({r.get("pass") for r in grp}, PASS_ORDER)
        unit, scale = _flops_unit(grp)
        fig, axes = plt.subplots(1, len(passes), figsize=(5.2 * len(passes), 4.2), squeeze=False)
        for ax, pass_ in zip(axes[0], passes):
            sel = [r for r in grp if r.get("pass") == pass_]
            for b in _order({r["backend"] for r in sel}, ATTN_BACKEND_ORDER):
                pts = sorted(((r["shape"]["T_q"], r["tflops"] * scale) for r in sel if r["backend"] == b))
                style = "--" if b.startswith("sdpa") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=b)
            ax.set_xscale("log", base=2)
            ts = sorted({r["shape"]["T_q"] for r in sel})
            ax.set_xticks(ts)
            ax.set_xticklabels([f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ts])
            ax.minorticks_off()
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(unit)
            ax.set_title(f"{pass_}")
            ax.grid(True, alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="best")
        fig.suptitle(f"attention {dtype}, head dim {d}, {'causal' if causal else 'non-causal'} — {dev}", fontsize=10)
        fig.tight_layout()
        path = plot_dir / f"attention_{slug(dev)}_{dtype}_d{d}_{'causal' if causal else 'full'}{suffix}.png"
        plot_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def swiglu_plot(dev: str, rows: list, plot_dir: Path, suffix: str = "") -> list:
    written = []
    for op in ("swiglu", "swiglu_packed"):
        written += _swiglu_plot(
            dev,
            [r for r in rows if (r.get("op") or "swiglu") == op],
            plot_dir,
            suffix if op == "swiglu" else f"_packed{suffix}",
        )
    return written


def _swiglu_plot(dev: str, rows: list, plot_dir: Path, suffix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = [r for r in rows if r.get("suite") == "swiglu" and r.get("gbps")]
    if not sw:
        return []
    passes = _order({r.get("pass") for r in sw}, ("fwd", "fwd+bwd"))
    backends = _order({r["backend"] for r in sw}, SWIGLU_BACKEND_ORDER)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(backends) * len(passes), 4))
    width = 0.8 / len(passes)
    for i, pass_ in enumerate(passes):
        vals = []
        for b in backends:
            hit = [r["gbps"] for r in sw if r["backend"] == b and r.get("pass") == pass_]
            vals.append(hit[0] if hit else 0.0)
        ax.bar([x + i * width for x in range(len(backends))], vals, width, label=pass_)
    ax.set_xticks([x + width * (len(passes) - 1) / 2 for x in range(len(backends))])
    ax.set_xticklabels(backends, rotation=20)
    ax.set_ylabel("GB/s")
    s = sw[0].get("shape") or {}
    what = "SwiGLU packed" if sw[0].get("op") == "swiglu_packed" else "SwiGLU"
    ax.set_title(f"{what} {s.get('rows')}x{s.get('cols')} {sw[0].get('dtype')} — {dev}", fontsize=10)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / f"swiglu_{slug(dev)}{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ---- main ---------------------------------------------------------------------------------------
def build_report(
    selected: list, plot_dir: Optional[Path], md_dir: Path, short: bool = False, speedrun: Iterable[dict] = ()
) -> tuple[str, str, list]:
    """(full markdown, short summary markdown, written plot paths); ``speedrun``: the speedrun rows of
    every commit (reported apart from the per-commit groups)."""
    parts = [
        "# fastlm benchmark report",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results.jsonl` "
        "(`pytest benchmarks --benchmark-only` with `FASTLM_BENCH_RECORD=1`; always on CUDA).",
        "",
    ]
    summary = []
    plots = []
    if not selected:
        parts += ["No results recorded yet.", ""]
    seen = set()
    for dev, commit, rows in selected:
        head = device_header(dev, commit, rows)
        parts += head
        suffix = f"_{slug(commit)}" if dev in seen else ""  # older commits (--all-commits) keep their own files
        seen.add(dev)
        if plot_dir is not None:
            new = attention_plots(dev, rows, plot_dir, suffix) + swiglu_plot(dev, rows, plot_dir, suffix)
            plots += new
            if new:
                parts += [
                    " ".join(
                        f"![{p.stem}]({p.relative_to(md_dir).as_posix() if p.is_relative_to(md_dir) else p.as_posix()})"
                        for p in new
                    ),
                    "",
                ]
        parts += (
            attention_section(rows)
            + masks_section(rows)
            + swiglu_section(rows)
            + qk_norm_section(rows)
            + layer_norm_section(rows)
            + attention_qkv_section(rows)
            + model_section(rows)
            + optimizer_section(rows)
            + default_step_section(rows)
            + generate_section(rows)
        )
        summary += head + attention_section(
            [r for r in rows if r.get("pass") == "fwd+bwd"],
            details=False,
            columns=SHORT_ATTN_COLUMNS if short else None,
        )
        summary += (
            swiglu_section(rows)
            + qk_norm_section(rows)
            + layer_norm_section(rows)
            + attention_qkv_section(rows)
            + model_section(rows)
            + optimizer_section(rows)
            + default_step_section(rows)
            + generate_section(rows)
        )
    parts += speedrun_section(list(speedrun))
    summary += speedrun_section(list(speedrun))
    return "\n".join(parts).rstrip() + "\n", "\n".join(summary).rstrip() + "\n", plots


# ---- rows of benchmarks.gpu_check ---------------------------------------------------------------
def _first(row: dict, *keys):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def gpu_check_tables(rows: list) -> str:
    """The README's GPU section from ``gpu_check`` rows: ceilings, then one table per timed step
    (headline first), then every row that is not ok with its reason."""
    env = {r["name"]: r for r in rows if r.get("step") == "env"}
    out = [f"Device: {rows[0].get('device')} (commit {rows[0].get('commit')})" if rows else "no rows"]
    if "copy_bandwidth" in env and "matmul_rate" in env:
        out.append(
            f"Ceilings: copy {fmt(env['copy_bandwidth'].get('GBps'))} GB/s, "
            f"matmul {fmt(env['matmul_rate'].get('TFLOPs'))} TFLOP/s"
        )
    timed = [r for r in rows if r.get("status") == "ok" and "ms" in r and r.get("step") != "env"]
    for step in ("headline", "fwdbwd", "sweep", "cuda_attn", "swiglu", "train_step"):
        mine = [r for r in timed if r["step"] == step]
        if not mine:
            continue
        body = [
            [
                r["name"],
                fmt(r["ms"]),
                f"{fmt(r.get('ms_q20'))}-{fmt(r.get('ms_q80'))}",
                fmt(_first(r, "TFLOPs", "TBps", "tokens_per_s")),
                fmt(_first(r, "pct_of_matmul", "pct_of_copy", "mfu_pct")),
                f"{fmt(r.get('launched_n_regs'))} / {fmt(r.get('launched_n_spills'))}",
            ]
            for r in mine
        ]
        out += [
            "",
            f"**{step}**",
            "",
            table(
                [
                    "row",
                    "median ms",
                    "q20-q80 ms",
                    "TFLOP/s, TB/s or tok/s",
                    "% of ceiling or MFU",
                    "regs / spills (launched)",
                ],
                body,
            ),
        ]
    res = [r for r in rows if r.get("status") == "ok" and r.get("name", "").startswith("triton_fwd_resources/")]
    if res:
        body = [
            [
                r["config"],
                fmt(_first(r, "n_regs", "cubin_regs", "ptxas_regs")),
                fmt(_first(r, "n_spills", "ptxas_spill_store_bytes")),
                fmt(r.get("shared_bytes")),
            ]
            for r in res
        ]
        out += [
            "",
            "**Triton forward kernels (D=128 bf16): resources**",
            "",
            table(["config", "registers", "spills (driver n_spills, else ptxas bytes)", "shared bytes"], body),
        ]
    bad = [r for r in rows if r.get("status") not in ("ok", None) and r.get("name") != "step"]
    if bad:
        out += ["", "Not measured / failed:", ""]
        out += [f"- {r['step']}/{r['name']}: {r['status']} ({r.get('reason') or 'see errors'})" for r in bad]
    return "\n".join(out) + "\n"


def gpu_check_plot(rows: list, plot_dir: Path) -> Optional[Path]:
    """Bar plot of the headline TFLOP/s (Triton per pinned config, SDPA's kernels)."""
    rows = [r for r in rows if r.get("step") == "headline" and r.get("status") == "ok" and "TFLOPs" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows], [r["TFLOPs"] for r in rows])
    ax.set_xlabel("TFLOP/s (forward, causal, B=2 H=16 T=8192 D=128 bf16)")
    fig.tight_layout()
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / f"gpu_check_headline_{slug(rows[0].get('device') or 'gpu')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=BENCH_DIR / "results.jsonl", help="JSON-lines results file")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "REPORT.md", help="markdown report to write")
    p.add_argument("--plots", type=Path, default=BENCH_DIR / "plots", help="folder for the PNG plots")
    p.add_argument("--device", default=None, help="only devices whose name contains this (case-insensitive)")
    p.add_argument("--all-commits", action="store_true", help="report every commit group, not the newest")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--summary",
        action="store_true",
        help="print the headline tables (attention fwd+bwd, swiglu, model, generation) to stdout",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help="with --summary: attention columns auto, triton, cuda, cpp, reference, sdpa, sdpa-flash, sdpa-cudnn only",
    )
    p.add_argument(
        "--gpu-check",
        type=Path,
        default=None,
        help="a gpu_check results.jsonl: print its tables (markdown) and write its plot to --plots",
    )
    args = p.parse_args(argv)
    if args.gpu_check is not None:
        return _gpu_check_main(args)

    if not args.results.exists():
        print(
            f"error: no results file at {args.results} (run FASTLM_BENCH_RECORD=1 pytest benchmarks "
            f"--benchmark-only first)",
            file=sys.stderr,
        )
        return 2
    rows, bad = load_rows(args.results)
    if bad:
        print(f"warning: skipped {bad} malformed line(s) in {args.results}", file=sys.stderr)
    speedrun = [
        r
        for r in rows
        if r.get("suite") == "speedrun" and (not args.device or args.device.lower() in str(r["device"]).lower())
    ]
    selected = select(
        [r for r in rows if r.get("suite") != "speedrun"], device=args.device, all_commits=args.all_commits
    )
    if not selected and not speedrun:
        what = f" for device matching {args.device!r}" if args.device else ""
        print(f"error: no usable rows in {args.results}{what}", file=sys.stderr)
        return 1
    md_dir = args.out.resolve().parent
    full, summary, plots = build_report(
        selected, None if args.no_plots else args.plots.resolve(), md_dir, short=args.short, speedrun=speedrun
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(full, encoding="utf-8")
    print(
        f"wrote {args.out} ({sum(len(r) for _, _, r in selected)} rows, {len(selected)} device/commit group(s))"
        + (f" and {len(plots)} plot(s) in {args.plots}" if plots else "")
    )
    if args.summary:
        print()
        print(summary)
    return 0


def _gpu_check_main(args) -> int:
    if not args.gpu_check.exists():
        print(f"error: no gpu_check results at {args.gpu_check}", file=sys.stderr)
        return 2
    rows, bad = [], 0
    for line in args.gpu_check.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "step" in row and "name" in row:
            rows.append(row)
        elif line.strip():
            bad += 1
    if bad:
        print(f"warning: skipped {bad} malformed line(s) in {args.gpu_check}", file=sys.stderr)
    if rows and rows[-1].get("run"):  # the newest run of the file
        rows = [r for r in rows if r.get("run") == rows[-1]["run"]]
    print(gpu_check_tables(rows))
    plot = None if args.no_plots else gpu_check_plot(rows, args.plots)
    if plot is not None:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastlm.info``: which backends are usable here, and why not the others, and the peak
FLOP/s that training runs measure their MFU against (``--calibrate``: measure the CPU peak again)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from fastlm import ops
from fastlm._version import __version__
from fastlm.training import mfu
from fastlm.training.runtime import cpu_native_bf16, resolve_dtype

__all__ = ["report", "main"]


def peak_lines(calibrate: bool = False) -> list:
    """The peak(s) MFU is measured against here (see :mod:`fastlm.training.mfu`)."""
    cpu = mfu.calibrate_cpu(force=calibrate)
    lines = [f"peak for MFU, CPU ({mfu.cpu_model()}): {mfu.format_flops(cpu.flops_per_s)}/s ({cpu.source})"]
    if cpu_native_bf16():
        bf16 = mfu.calibrate_cpu(force=calibrate, dtype=torch.bfloat16)
        lines.append(f"peak for MFU, CPU bfloat16 runs: {mfu.format_flops(bf16.flops_per_s)}/s ({bf16.source})")
    auto = str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    lines.append(f"CPU training dtype (--dtype auto): {auto} (native bf16: {cpu_native_bf16()})")
    if torch.cuda.is_available():
        for dtype in (torch.bfloat16, torch.float32):
            gpu = mfu.peak_flops("cuda", dtype)
            rate = f"{mfu.format_flops(gpu.flops_per_s)}/s" if gpu.flops_per_s else "unknown"
            lines.append(f"peak for MFU, CUDA {str(dtype).replace('torch.', '')} runs: {rate} ({gpu.source})")
    return lines


def report(calibrate: bool = False) -> str:
    lines = [f"fastlm {__version__}  python {platform.python_version()}  torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # noqa: BLE001 - report whatever went wrong
        lines.append(f"triton: not importable ({type(e).__name__}: {e})".splitlines()[0])
    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name(0) if cuda else "none"
    lines.append(f"CUDA available: {cuda} (device: {dev}; torch built with CUDA {torch.version.cuda})")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"MPS available: {bool(mps and mps.is_available())}")
    lines += [f"{name}: {about}" for name, about in ops.backend_details().items() if about]
    lines += peak_lines(calibrate)
    lines.append("backends:")
    for name, why in ops.backend_status().items():
        lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm.info", description=__doc__)
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the CPU's peaks (fp32, and bf16 where native) again; the higher figures are kept",
    )
    args = parser.parse_args(argv)
    print(report(args.calibrate))
    return 0


if __name__ == "__main__":
    sys.exit(main())

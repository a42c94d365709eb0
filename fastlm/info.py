"""``python -m fastlm.info``: which backends are usable here, and why not the others."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from fastlm import ops
from fastlm._version import __version__

__all__ = ["report", "main"]


def report() -> str:
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
    lines.append("backends:")
    for name, why in ops.backend_status().items():
        lines.append(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm.info", description=__doc__)
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

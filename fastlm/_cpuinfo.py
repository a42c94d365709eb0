"""The CPU's vector features, for the build (setup.py runs this file on its own, before fastlm or torch
can be imported) and for the check that a built ``fastlm._C`` suits the CPU running it (fastlm._ext)."""
from __future__ import annotations

from typing import Optional

#: CPU flags each vector level of the C++ kernels needs (AVX512: torch's AVX512 level)
CPU_LEVEL_FLAGS = {"AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "AVX2": ("avx2", "fma", "f16c")}


def cpu_flags() -> Optional[set]:
    """This CPU's feature flags from /proc/cpuinfo, or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None

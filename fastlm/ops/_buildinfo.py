"""What the build and the loader of ``fastlm._C`` must agree on: the CPU's vector features and the
fingerprint of the C++/CUDA sources. setup.py runs this file on its own (before fastlm or torch can be
imported); fastlm.ops.extension imports it to check that a built ``_C`` suits the CPU running it and, in a
source checkout, that an installed ``_C`` was built from the checkout's own ``csrc/``."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

#: marker before the sources' sha256 in the compiled extension (setup.py passes the string in)
SOURCE_HASH_MARKER = b"fastlm-csrc-sha256:"

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


def csrc_hash(csrc_dir: str) -> str:
    """sha256 over every file under ``csrc_dir`` (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(csrc_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, csrc_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                data = f.read()
            digest.update(f"{rel}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def embedded_csrc_hash(extension_path: str) -> Optional[str]:
    """The sources' sha256 a built extension carries (read from the file, without loading it)."""
    try:
        with open(extension_path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    at = blob.find(SOURCE_HASH_MARKER)
    if at < 0:
        return None
    value = blob[at + len(SOURCE_HASH_MARKER) : at + len(SOURCE_HASH_MARKER) + 64]
    return value.decode("ascii") if len(value) == 64 and all(c in b"0123456789abcdef" for c in value) else None

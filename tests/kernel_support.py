"""Where the CPU brgemm fp32 head kernel must exist (shared by the kernel and head tests).

The kernel needs a C++ compiler and a CPU with bf16 dot-product instructions
(AVX512-BF16 or AMX). Where both are present it must have built: tests then
expect it, so a broken build fails them instead of silently taking the
fallback path.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path


def brgemm_expected() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return shutil.which("c++") is not None and bool(
        re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))

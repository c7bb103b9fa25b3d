"""What CPU a latency was measured on: model name, int8 dot-product features, thread count."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Instructions that make int8 convolutions faster than float on CPU (x86 VNNI / AMX, ARM dot-product
# and int8 matrix multiply). Without any of them, XNNPACK's int8 kernels gain little over fp32.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_tile", "asimddp", "i8mm")


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo_text().splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    for line in _cpuinfo_text().splitlines():
        if line.lower().startswith(("flags", "features")):
            return set(line.split(":", 1)[1].split())
    return set()


def int8_features() -> list[str]:
    flags = cpu_flags()
    return [flag for flag in INT8_FLAGS if flag in flags]


# x86 instructions that sum u8 x s8 products in 32 bits (vpdpbusd; AMX tiles). Without one, ONNX
# Runtime's and OpenVINO's int8 convolutions use vpmaddubsw, whose pair sums saturate at int16.
X86_INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


def saturating_int8() -> bool:
    """Whether this CPU's int8 convolutions add u8 x s8 products in pairs in 16 bits and saturate:
    x86 without VNNI or AMX. ARM kernels widen before they add, so they never do."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not cpu_flags() & set(X86_INT8_DOT)


def cpu_description() -> str:
    """One line, e.g. ``AMD EPYC (x86_64), 2 cores, int8 features: none (avx2)``."""
    flags = cpu_flags()
    int8 = ", ".join(int8_features()) or "none"
    simd = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "")
    suffix = f" ({simd})" if simd else ""
    return f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, int8 features: {int8}{suffix}"

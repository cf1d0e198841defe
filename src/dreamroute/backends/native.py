"""What native code runs on this host: an instruction-set probe that executes, and llama.cpp's build flags.

``/proc/cpuinfo`` says what a CPU advertises, not what a virtual machine lets
run: one host here reported ``amx_tile``, the kernel granted the tile
permission, and ``tileloadd`` still trapped (SIGILL inside libggml-cpu). So the
probe decides by execution: for each x86 extension llama.cpp's CPU backend can
be built with, a small C program using one of its instructions is compiled with
the matching ``-m`` flag and run in a subprocess; the extension counts only if
the program exits cleanly. The build flags (``CMAKE_ARGS``) enable exactly the
extensions that ran, with ``GGML_NATIVE=OFF`` (``-march=native`` trusts CPUID)
and AMX always off (its tile kernels only speed up a few quantisation types,
and it is the extension seen trapping).

The flags key the wheel cache (:func:`build_key`), so a wheel built on another
host is reused only when this host's probe asks for the same flags.

This module imports nothing outside the standard library: ``scripts/setup.sh``
runs it (``python src/dreamroute/backends/native.py probe``) before dreamroute or
llama-cpp-python is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python release setup builds (pyproject's ``llama`` extra pins the same)."""

# extension -> (gcc flags, C body using one of its instructions; `volatile` keeps it from being folded)
_X86_TESTS: dict[str, tuple[tuple[str, ...], str]] = {
    "sse42": (("-msse4.2",), "volatile unsigned x = 1; x = _mm_crc32_u32(x, 7u); return (int)(x & 0);"),
    "avx": (("-mavx",), "volatile float f = 1.f; __m256 a = _mm256_set1_ps(f); a = _mm256_add_ps(a, a);"
            " return (int)_mm256_cvtss_f32(a) - 2;"),
    "avx2": (("-mavx2",), "volatile int i = 1; __m256i a = _mm256_set1_epi32(i); a = _mm256_add_epi32(a, a);"
             " return _mm256_extract_epi32(a, 0) - 2;"),
    "fma": (("-mfma",), "volatile float f = 1.f; __m256 a = _mm256_set1_ps(f); a = _mm256_fmadd_ps(a, a, a);"
            " return (int)_mm256_cvtss_f32(a) - 2;"),
    "f16c": (("-mf16c",), "volatile float f = 1.f; __m128i h = _mm_cvtps_ph(_mm_set1_ps(f), 0);"
             " return (int)_mm_cvtss_f32(_mm_cvtph_ps(h)) - 1;"),
    "bmi2": (("-mbmi2",), "volatile unsigned x = 0xffu; return (int)_pdep_u32(x, 1u) - 1;"),
    "avx512f": (("-mavx512f",), "volatile float f = 1.f; __m512 a = _mm512_set1_ps(f); a = _mm512_add_ps(a, a);"
                " return (int)_mm512_reduce_add_ps(a) - 32;"),
    "avx512cd": (("-mavx512f", "-mavx512cd"), "volatile int i = 1; __m512i a = _mm512_set1_epi32(i);"
                 " a = _mm512_lzcnt_epi32(a); return _mm512_reduce_add_epi32(a) - 16 * 31;"),
    "avx512vl": (("-mavx512f", "-mavx512vl"), "volatile int i = 1; __m256i a = _mm256_set1_epi32(i);"
                 " a = _mm256_ternarylogic_epi32(a, a, a, 0xff); return _mm256_extract_epi32(a, 0) + 1;"),
    "avx512dq": (("-mavx512f", "-mavx512dq"), "volatile long long i = 3; __m512i a = _mm512_set1_epi64(i);"
                 " a = _mm512_mullo_epi64(a, a); return (int)_mm512_reduce_add_epi64(a) - 72;"),
    "avx512bw": (("-mavx512f", "-mavx512bw"), "volatile char c = 1; __m512i a = _mm512_set1_epi8(c);"
                 " a = _mm512_add_epi8(a, a); return (int)_mm512_reduce_add_epi32(a) - 16 * 0x02020202;"),
    "avx512vbmi": (("-mavx512f", "-mavx512vbmi"), "volatile char c = 1; __m512i a = _mm512_set1_epi8(c);"
                   " a = _mm512_permutexvar_epi8(a, a); return _mm512_reduce_add_epi32(a) - 16 * 0x01010101;"),
    "avx512vnni": (("-mavx512f", "-mavx512vnni"), "volatile int i = 0x01010101; __m512i a = _mm512_set1_epi32(i);"
                   " a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, a); return _mm512_reduce_add_epi32(a) - 64;"),
    "avx512bf16": (("-mavx512f", "-mavx512bf16"), "volatile float f = 1.f; __m512 a = _mm512_set1_ps(f);"
                   " __m512bh b = _mm512_cvtne2ps_pbh(a, a); a = _mm512_dpbf16_ps(_mm512_setzero_ps(), b, b);"
                   " return (int)_mm512_reduce_add_ps(a) - 32;"),
    "avxvnni": (("-mavxvnni",), "volatile int i = 0x01010101; __m256i a = _mm256_set1_epi32(i);"
                " a = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, a); return _mm256_extract_epi32(a, 0) - 4;"),
    # AMX: ask the kernel for the tile state (ARCH_REQ_XCOMP_PERM = 0x1023, XTILEDATA = 18), then load a tile
    "amx_tile": (("-mamx-tile",), "static unsigned char cfg[64] __attribute__((aligned(64)));"
                 " static unsigned char buf[1024] __attribute__((aligned(64)));"
                 " if (syscall(SYS_arch_prctl, 0x1023, 18)) return 3;"
                 " cfg[0] = 1; cfg[16] = 64; cfg[48] = 16; _tile_loadconfig(cfg);"
                 " _tile_loadd(0, buf, 64); _tile_release(); return 0;"),
}

_PROLOGUE = "#include <immintrin.h>\n#include <unistd.h>\n#include <sys/syscall.h>\nint main(void) { %s }\n"

# GGML option -> the extensions that must all have run for it to be ON
_GGML_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse42",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avxvnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512bf16"),
}
_ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_CPU_ALL_VARIANTS")


@dataclass
class Probe:
    """What the probe found on this host.

    Attributes:
        machine: ``platform.machine()`` (``x86_64``, ``aarch64``, ...).
        ran: extension -> True (its program exited 0), False (trapped or wrong
            result); empty off x86 or without a C compiler.
        detail: extension -> how it failed (``SIGILL``, ``exit 3``, ``compile error``).
        compiler: the compiler used and its version line, or ``None``.
    """

    machine: str
    ran: dict[str, bool] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)
    compiler: str | None = None

    @property
    def executes(self) -> list[str]:
        """The extensions whose instruction ran, sorted."""
        return sorted(k for k, ok in self.ran.items() if ok)


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def probe(timeout_s: float = 20.0) -> Probe:
    """Compile and run one small program per x86 extension; an extension counts only if it ran.

    Returns:
        :class:`Probe`. Off x86-64 nothing is probed (llama.cpp's defaults are
        used there; its ARM builds select kernels by HWCAP at run time).
    """
    p = Probe(machine=platform.machine())
    if p.machine.lower() not in ("x86_64", "amd64"):
        return p
    cc = _compiler()
    if cc is None:
        p.detail["compiler"] = "no C compiler (gcc, cc or clang) on PATH"
        return p
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True)
    p.compiler = f"{cc}: {(ver.stdout.splitlines() or ['?'])[0]}"
    with tempfile.TemporaryDirectory(prefix="dreamroute-probe-") as tmp:
        for name, (flags, body) in _X86_TESTS.items():
            src, exe = Path(tmp) / f"{name}.c", Path(tmp) / name
            src.write_text(_PROLOGUE % body)
            c = subprocess.run([cc, "-O0", *flags, str(src), "-o", str(exe)], capture_output=True, text=True)
            if c.returncode != 0:
                p.ran[name], p.detail[name] = False, "compile error: " + (c.stderr.strip().splitlines() or ["?"])[-1]
                continue
            try:
                r = subprocess.run([str(exe)], capture_output=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.ran[name], p.detail[name] = False, f"no exit within {timeout_s:g} s"
                continue
            p.ran[name] = r.returncode == 0
            if r.returncode < 0:
                p.detail[name] = signal.Signals(-r.returncode).name
            elif r.returncode:
                p.detail[name] = f"exit {r.returncode}"
    return p


def cmake_args(pr: Probe, *, safe: bool = False) -> list[str]:
    """llama.cpp CMake options for a build that runs here.

    Args:
        pr: the probe result.
        safe: every optional x86 extension off (SSE2 only: slow, runs on any x86-64);
            the fallback when a build from the probed flags fails its proof.

    Returns:
        ``-DNAME=VALUE`` strings, sorted; ``GGML_NATIVE=OFF`` and AMX off on x86-64;
        empty off x86 (llama.cpp's own defaults).
    """
    if pr.machine.lower() not in ("x86_64", "amd64"):
        return []
    opts = {"GGML_NATIVE": "OFF", **{k: "OFF" for k in _ALWAYS_OFF}}
    for opt, needs in _GGML_OPTIONS.items():
        opts[opt] = "ON" if not safe and all(pr.ran.get(n) for n in needs) else "OFF"
    return sorted(f"-D{k}={v}" for k, v in opts.items())


def build_key(args: list[str], version: str = LLAMA_CPP_PYTHON) -> str:
    """A short digest naming one llama-cpp-python build: its version, CMake options and Python."""
    tag = f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    return hashlib.sha256(json.dumps([version, sorted(args), tag]).encode()).hexdigest()[:16]


def report(pr: Probe, *, safe: bool = False) -> dict:
    """The probe and the build it asks for, as one JSON-ready dict (``probe``, ``cmake_args``, ``key``)."""
    args = cmake_args(pr, safe=safe)
    return {"probe": asdict(pr) | {"executes": pr.executes}, "cmake_args": args,
            "key": build_key(args), "llama_cpp_python": LLAMA_CPP_PYTHON}


def main(argv: list[str]) -> int:
    """``python native.py probe [--safe]``: print :func:`report` as JSON."""
    if not argv or argv[0] != "probe":
        print("usage: python -m dreamroute.backends.native probe [--safe]", file=sys.stderr)
        return 2
    print(json.dumps(report(probe(), safe="--safe" in argv), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Native CPU kernels, compiled on first use by the local C++ compiler and cached.

`torch.utils.cpp_extension.load` builds each `<name>.cpp` of this folder as its own module
against the installed torch (needs g++ and ninja; under a minute each, once, then cached
under `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`). The .h files are parts
of one build unit, #included by paged_attention.cpp (one per operation family and ISA: see
docs/kernels.md); their contents are hashed into the module's name (_cpu_tag). When the build is
impossible (no compiler, or `LEANSERVE_NATIVE_KERNELS=0`), callers fall back to plain torch
ops: slower, same results.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# -ffast-math lets the vectorizer reorder float sums and use glibc's vector expf (the kernel
# never forms an infinity or a NaN on valid input). AMX is off for the compiler's own code
# (some VMs advertise it yet fault on its instructions): the one AMX kernel (W8A8) enables
# it for its own functions and runs only after asking the OS for the tile state.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-ffast-math"]


@functools.cache
def _flags_line() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent)."""
    return frozenset(_flags_line().partition(":")[2].split())


def int8_dot_products() -> bool:
    """Whether int8 x int8 products sum exactly into int32 here (AMX-INT8, AVX512-VNNI or
    AVX-VNNI). Without them oneDNN's x86 int8 path pairs products in saturating int16
    (vpmaddubsw): on an AVX2-only CPU a W8A8 layer then parted from the exact sums by 1.8%
    (twice its quantization error). Unknown flags (no /proc/cpuinfo) count as yes."""
    flags = cpu_flags()
    return not flags or bool(flags & {"amx_int8", "avx512_vnni", "avx_vnni"})


def _cpu_tag() -> str:
    """The build is tuned for this CPU (-march=native): name it by the CPU's feature flags,
    so a cache shared with another machine never loads code this CPU cannot run; and by the
    shared headers here, which torch's rebuild check (over the .cpp sources) does not read."""
    headers = b"".join(p.read_bytes() for p in sorted(HERE.glob("*.h")))
    return hashlib.blake2b(_flags_line().encode() + headers, digest_size=4).hexdigest()


def names() -> list[str]:
    """The kernel modules there are: one per .cpp file here."""
    return sorted(p.stem for p in HERE.glob("*.cpp"))


STALE_LOCK_SECONDS = 600  # a build here takes under a minute; a lock this old outlived its builder


def clear_stale_lock(module: str) -> bool:
    """Removes the build lock of `module` if it is older than STALE_LOCK_SECONDS. torch's
    builder takes a lock file in the build folder and every other process waits for it to
    vanish, without a timeout: a build killed midway (kill -9, OOM) left it behind, and
    every later start of any server then hung at the first kernel use. True if removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(module, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
        if age < STALE_LOCK_SECONDS:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    log.warning("removed a stale build lock %s (%.0f s old: its build was killed)", lock, age)
    return True


@functools.cache
def native(name: str = "paged_attention"):
    """The compiled module `name` (a .cpp file here), or None when it cannot be built here."""
    if os.environ.get("LEANSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        module = f"leanserve_{name}_{_cpu_tag()}"
        clear_stale_lock(module)
        return load(name=module, sources=[str(HERE / f"{name}.cpp")], extra_cflags=CFLAGS)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch fallback
        log.warning("native kernels %s unavailable, using torch ops instead: %s", name, e)
        return None


def first_argmax(x):
    """The index of each row's first maximum, as `argmax(dim=-1)` gives it. bf16 logits go
    to the native kernel, one vectorized pass (128 x 49152: ~0.3 ms, against ~3 ms for the
    float32 copy plus torch's max); anything else to `max(dim=-1)`, which promises the same
    index and is ~6x faster than argmax on CPU here."""
    import torch

    if x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(-1) == 1 and (kernels := native()) is not None:
        return kernels.first_argmax(x)
    return x.max(dim=-1).indices

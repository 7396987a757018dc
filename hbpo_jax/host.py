"""The process's memory allocator: glibc's malloc with transparent huge pages.

XLA:CPU allocates a program's buffers afresh on every call, and with 4 KiB pages the kernel
zero-fills each page on first touch. On the 2-core CI machine those page faults were a quarter of
the tiny config's SFT step (355 → 275 ms at 16 × 128 tokens) with identical results. glibc reads
its tunables once, when the process starts, so `use_huge_pages` re-executes the program with
GLIBC_TUNABLES set; the launchers call it before anything imports jax. A GLIBC_TUNABLES already
in the environment (even empty) is kept as it is, and nothing happens off Linux/glibc.
"""
from __future__ import annotations

import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"  # malloc's blocks madvise()d as huge pages (glibc >= 2.35)


def use_huge_pages() -> None:
    """Re-executes this program (same interpreter, same command line, same PID) with
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1, unless GLIBC_TUNABLES is set or this is not Linux with
    glibc. Returns only when nothing was done (or exec failed: the program then runs as it is)."""
    if "GLIBC_TUNABLES" in os.environ or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = HUGE_PAGES
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:
        return


# Where a TPU VM exposes its chips: /dev/accel* (v4, v5p and earlier), /dev/vfio (v5e, v6e).
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio")


def skip_absent_tpu() -> str | None:
    """On a machine with libtpu installed but no TPU (no TPU_DEVICE_FILES), JAX would still try
    the TPU backend first and print libtpu's initialization errors ("unexpected worker hostname",
    "Unable to initialize backend 'tpu'") at every start. There this sets JAX's platforms to "cpu",
    unless the user chose platforms (JAX_PLATFORMS) or a GPU plugin is installed (its platforms
    are left to JAX). Call before JAX's first backend use. Returns the platforms set, or None."""
    import glob
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or any(glob.glob(p) for p in TPU_DEVICE_FILES):
        return None
    if importlib.util.find_spec("libtpu") is None:
        return None
    if any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                              "jax_rocm60_plugin", "jax_plugins")):
        return None
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # jax read the environment when it was imported
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return "cpu"

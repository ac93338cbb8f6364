"""glibc ``malloc`` policies for large-tensor CPU work: reuse freed buffers, or return them at once.

PyTorch's CPU tensors come from the C library's ``malloc``. On Linux (glibc) every buffer above the
*mmap threshold* is a fresh ``mmap`` that the kernel zero-fills page by page on first touch, and it is
unmapped again when freed. A 3D U-Net allocates and frees tens of MiB of activations per layer, so
with the default settings each window pays those page faults again: up to a quarter of CPU inference
time and of a training iteration (figures below, ``docs/benchmark.md``, ``allocator`` rows). The settings are process-wide (``mallopt`` has no
narrower scope), so they are applied around one call with :func:`malloc_policy`:

* ``"reuse"``: mmap threshold and trim threshold set very high, so freed activations stay in the
  heap and the next window reuses them without page faults; on exit the settings go back to glibc's
  steady state (below) and ``malloc_trim(0)`` returns the heap's free memory to the OS, so the process
  does not keep the peak. Fastest: the full-size generator in bfloat16 on 128×256×256, 64³ windows,
  4 per pass, 18.6–19.0 → 14.2–14.4 s (auto windows 9.1 → 7.3–8.6 s); peak RSS 8–16 % higher
  (freed buffers are held until reused), measured in fresh processes on 2 CPU cores.
* ``"release"``: a small fixed mmap threshold (128 KiB): every larger buffer is unmapped when freed,
  so the peak RSS is the live memory and does not grow with the number of blocks processed
  (out-of-core inference, :func:`bundle.ooc.deconvolve_zarr`; about 7 % slower).
* ``"system"``: leave the allocator alone.

glibc adjusts its thresholds itself only until they are first set; "back to the steady state" sets
them to where that dynamic rule ends for PyTorch-sized buffers (mmap threshold 32 MiB, trim threshold
64 MiB). Elsewhere (macOS, Windows, musl) every policy is a no-op and :func:`malloc_policy` yields
False. No library exposes ``mallopt``/``malloc_trim``: ``ctypes`` on the C library is the
documented route, hence this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

__all__ = ["MALLOC_POLICIES", "apply_malloc_policy", "check_malloc_policy", "malloc_policy", "malloc_trim"]

MALLOC_POLICIES = ("reuse", "release", "system")

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1
_SETTINGS = {
    # large: measured 0.246 -> 0.187 s per bf16 64^3 window pass (66 -> 87 % of the conv roofline)
    "reuse": {_M_MMAP_THRESHOLD: _INT_MAX, _M_TRIM_THRESHOLD: _INT_MAX, _M_TOP_PAD: 512 << 20},
    "release": {_M_MMAP_THRESHOLD: 128 << 10},
    # glibc's dynamic thresholds end here once buffers of >= 32 MiB have been freed (DEFAULT_MMAP_THRESHOLD_MAX)
    "steady": {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20, _M_TOP_PAD: 128 << 10},
}


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc: no mallopt / malloc_trim
        return None
    return libc


def check_malloc_policy(policy: str, name: str = "malloc policy") -> str:
    """``policy`` if it is one of :data:`MALLOC_POLICIES`; else ValueError naming ``name`` (the caller's argument)."""
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"{name} must be one of {MALLOC_POLICIES}, got {policy!r}")
    return policy


def apply_malloc_policy(policy: str) -> bool:
    """Set glibc's malloc thresholds for ``policy`` (``"reuse"``, ``"release"`` or ``"system"``); they stay.

    Returns:
        True if the settings were applied (glibc), False for ``"system"`` or another C library.

    Raises:
        ValueError: unknown policy.
    """
    check_malloc_policy(policy)
    libc = _glibc()
    if policy == "system" or libc is None:
        return False
    return all(bool(libc.mallopt(k, v)) for k, v in _SETTINGS[policy].items())


def malloc_trim() -> bool:
    """Return the heap's free memory to the OS (``malloc_trim(0)``); False where unavailable."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


_active: list[str] = []  # policies of the enclosing ``malloc_policy`` blocks, innermost last


@contextlib.contextmanager
def malloc_policy(policy: str) -> Iterator[bool]:
    """Apply ``policy`` for the ``with`` block, then restore the enclosing block's policy and trim the heap.

    Blocks nest: a ``Deconvolver`` call ("reuse") inside a training run under "reuse" leaves the run's
    policy in effect when it returns; outside any block glibc's steady state (module docstring) is
    restored. ``"system"`` changes nothing, so an enclosing policy stays in effect inside it.
    Yields whether the policy is in effect (False for ``"system"`` and on other C libraries).
    Not thread-safe across concurrent blocks with different policies (the settings are process-wide).

    Example::

        >>> with malloc_policy("reuse"):
        ...     y = deconvolver(x)  # activations reused between windows instead of re-faulted
    """
    applied = apply_malloc_policy(policy)
    _active.append(policy)
    try:
        yield applied
    finally:
        _active.pop()
        if applied:
            outer = next((p for p in reversed(_active) if p != "system"), None)
            if outer is not None:
                apply_malloc_policy(outer)
            else:
                libc = _glibc()
                for k, v in _SETTINGS["steady"].items():
                    libc.mallopt(k, v)  # type: ignore[union-attr]
            malloc_trim()

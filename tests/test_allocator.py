"""glibc malloc policies (bundle.allocator) and where the bundle applies them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bundle.inference.deconvolver
import bundle.ooc
import bundle.ooc.deconvolve
from bundle.allocator import _glibc, apply_malloc_policy, malloc_policy
from bundle.inference import Deconvolver
from bundle.networks import DeblurUNet

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def mallinfo2() -> _MallInfo2:
    libc = _glibc()
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


glibc_only = pytest.mark.skipif(
    _glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="malloc policies act on glibc (>= 2.33) only"
)


def _in_fresh_process(name: str) -> bool:
    """Run this module's test ``name`` alone in a new interpreter and say so (True), unless already there.

    The heap tests read glibc's process-wide state (free chunks, thresholds): whatever earlier tests
    left in the heap (gigabytes of free chunks after the inference tests) changed their outcome, so
    they run on a clean heap.
    """
    if os.environ.get("BUNDLE_ALLOCATOR_FRESH") == "1":
        return False
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{name}"],
        env={**os.environ, "BUNDLE_ALLOCATOR_FRESH": "1"}, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    return True


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="malloc policy"):
        apply_malloc_policy("fast")
    with pytest.raises(ValueError, match="allocator"):
        Deconvolver(DeblurUNet(features=(4, 4, 8, 8, 16, 4)), allocator="fast")
    assert apply_malloc_policy("system") is False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@glibc_only
def test_reuse_keeps_freed_buffers_then_trims():
    if _in_fresh_process("test_reuse_keeps_freed_buffers_then_trims"):
        return
    with malloc_policy("reuse") as applied:
        assert applied
        before = mallinfo2()
        buf = torch.ones(64 * MiB, dtype=torch.uint8)  # touched: resident
        assert mallinfo2().hblkhd == before.hblkhd  # from the heap, not a fresh mmap
        del buf
        kept = rss_bytes()
        freed = mallinfo2()
        assert freed.fordblks >= 64 * MiB  # kept in the heap for reuse
        again = torch.empty(32 * MiB, dtype=torch.uint8)
        assert mallinfo2().arena == freed.arena  # served from the freed memory: the heap did not grow
        del again
    assert rss_bytes() <= kept - 48 * MiB  # on exit malloc_trim gave the pages back to the OS


@glibc_only
def test_release_unmaps_large_buffers():
    if _in_fresh_process("test_release_unmaps_large_buffers"):
        return
    with malloc_policy("release"):
        before = mallinfo2()
        size = before.fordblks + MiB  # larger than all free heap memory: the threshold decides
        buf = torch.empty(size, dtype=torch.uint8)
        assert mallinfo2().hblkhd >= before.hblkhd + size  # its own mmap, unmapped on free
        del buf
        assert mallinfo2().hblkhd == before.hblkhd


def _recording(calls: list[str]):
    @contextlib.contextmanager
    def policy(name: str):
        calls.append(name)
        yield False

    return policy


def test_deconvolver_runs_under_its_policy(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(bundle.inference.deconvolver, "malloc_policy", _recording(calls))
    net = DeblurUNet(features=(4, 4, 8, 8, 16, 4)).eval()
    x = torch.rand(1, 1, 20, 40, 36)
    with torch.no_grad():
        y = Deconvolver(net, roi_size=(32, 32, 32), sw_batch_size=2, allocator="reuse")(x)
        z = Deconvolver(net, roi_size=(32, 32, 32), sw_batch_size=2)(x)  # a library call changes nothing by default
    assert calls == ["reuse", "system"]
    torch.testing.assert_close(y, z, rtol=0, atol=0)


def test_out_of_core_runs_under_release(monkeypatch, tmp_path):
    calls: list[str] = []
    monkeypatch.setattr(bundle.ooc.deconvolve, "malloc_policy", _recording(calls))
    net = DeblurUNet(features=(4, 4, 8, 8, 16, 4)).eval()
    volume = np.random.default_rng(0).random((20, 40, 36), dtype=np.float32)
    bundle.ooc.deconvolve_zarr(volume, tmp_path / "a.ome.zarr", net, roi_size=(32, 32, 32), sw_batch_size=2)
    bundle.ooc.deconvolve_zarr(
        volume, tmp_path / "b.ome.zarr", net, roi_size=(32, 32, 32), sw_batch_size=2, bounded_memory=False
    )
    assert calls == ["release", "system"]


@glibc_only
def test_policies_nest():
    if _in_fresh_process("test_policies_nest"):
        return
    def big_buffer_is_kept() -> bool:
        # larger than every free chunk the heap already holds (earlier tests leave some): the thresholds decide
        before = mallinfo2()
        size = max(64 * MiB, before.fordblks + MiB)
        buf = torch.ones(size, dtype=torch.uint8)
        mapped = mallinfo2().hblkhd > before.hblkhd
        del buf
        return not mapped and mallinfo2().fordblks >= size

    with malloc_policy("reuse"):
        with malloc_policy("reuse"):
            pass
        with malloc_policy("system"):
            assert big_buffer_is_kept()  # "system" changes nothing: the outer policy holds
        assert big_buffer_is_kept()  # the inner block restored the outer policy
    with malloc_policy("release"):
        pass
    assert not big_buffer_is_kept()  # outside every block: glibc's steady state (64 MiB > its 32 MiB threshold)


def test_malloc_policy_handler_spans_the_run(monkeypatch):
    from ignite.engine import Engine

    import bundle.handlers.common
    from bundle.handlers import MallocPolicy

    events: list[str] = []

    @contextlib.contextmanager
    def policy(name: str):
        events.append(f"enter {name}")
        yield True
        events.append("exit")

    monkeypatch.setattr(bundle.handlers.common, "malloc_policy", policy)
    engine = Engine(lambda e, batch: events.append("iteration"))
    MallocPolicy("reuse").attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert events == ["enter reuse", "iteration", "iteration", "exit"]
    with pytest.raises(ValueError, match="policy"):
        MallocPolicy("fast")


def test_training_configs_run_under_reuse():
    from monai.bundle import ConfigParser

    for files in (["configs/common.json", "configs/train.json"],
                  ["configs/common.json", "configs/train.json", "configs/train_supervised.json"]):  # fmt: skip
        parser = ConfigParser()
        parser.read_config([str(ROOT / f) for f in files])
        handlers = parser.get("train#handlers")
        assert {"_target_": "bundle.handlers.MallocPolicy", "policy": "@train_allocator"} in handlers, files
        assert parser.get_parsed_content("train_allocator") == "reuse"

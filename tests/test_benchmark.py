"""The benchmark's smoke run, and the speed changes it measures staying exact (PSF spectrum cache, autocast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_cli import run_script

from bundle.networks import PSFLayer
from bundle.ops import fft_convolve

from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_fixed_kernel_spectrum_cache_is_exact_and_follows_the_kernel(pad_mode):
    layer = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", pad_mode=pad_mode, gain=2.0, offset=0.1)
    x = torch.rand(2, 1, 12, 16, 10)
    expected = 2.0 * fft_convolve(x, layer.kernel(), pad_mode=pad_mode) + 0.1
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)  # second call: cached spectrum
    assert len(layer._spectrum_cache) == 1
    layer(torch.rand(1, 1, 8, 8, 8))  # another size: its own entry
    assert len(layer._spectrum_cache) == 2
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["kernel_module.psf"] = torch.roll(state["kernel_module.psf"], 1, dims=0)
    layer.load_state_dict(state)  # a new kernel invalidates the cache
    torch.testing.assert_close(
        layer(x), 2.0 * fft_convolve(x, layer.kernel(), pad_mode=pad_mode) + 0.1, rtol=0, atol=1e-6
    )
    assert "_spectrum_cache" not in layer.state_dict()


@pytest.mark.parametrize("parameterization", ["fixed", "parametric"])
def test_half_inputs_and_autocast_convolve_in_float32(parameterization):
    layer = PSFLayer.build(kernel_size=(7, 7, 7), parameterization=parameterization, na=1.0)
    x = torch.rand(1, 1, 12, 12, 12)
    ref = layer(x)
    out = layer(x.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)  # only the input's rounding differs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32
    out.sum().backward()  # gradients reach the kernel parameters through the float32 FFT
    if parameterization == "parametric":
        grad = layer.kernel_module.na_raw.grad
        assert grad is not None and torch.isfinite(grad)


@pytest.mark.slow
def test_quick_benchmark_writes_report(tmp_path):
    res = run_script("scripts/benchmark.py", ["--quick", "--out", str(tmp_path)], cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(data["train"]) == {"blind", "nonblind", "nonblindpaper", "conventional", "blind_reuse", "conventional_reuse"}
    assert data["train"]["blind_reuse"]["allocator"] == "reuse" and data["train"]["blind"]["allocator"] == "system"
    assert all(0 < row["peak_live_bytes"] for row in data["train"].values())
    assert data["psf"]["fixed_cache_max_abs_diff"] < 1e-5
    assert data["inference"]["reference"]["mvoxel_per_s"] > 0
    rl = data["rl"]
    assert rl["speedup_vs_skimage"] > 0 and np.isfinite(rl["psnr_db"]) and np.isfinite(rl["skimage_psnr_db"])
    report = (tmp_path / "benchmark.md").read_text()
    assert "Against the targets" in report and "out-of-core" in report and "scikit-image" in report
    # the bundle's default generator is what is measured (configs/common.json's kind, at the smoke run's widths)
    common = json.loads((ROOT / "configs" / "common.json").read_text())
    gen = data["settings"]["generator"]
    assert (gen["depth"], gen["norm"], gen["align_corners"]) == (
        common["generator_depth"],
        common["generator_norm"],
        common["generator_align_corners"],
    )
    assert "Generator: `default`" in report
    # the default against batch norm kept and a 4x pass budget, timed in alternation: same outputs
    il = data["interleaved"]
    assert all(len(t) == 2 for t in il["times_s"].values()) and set(il["times_s"]) == {"default", "batch_norm_kept", "budget_x4"}
    assert max(il["psnr_vs_truth_db"].values()) - min(il["psnr_vs_truth_db"].values()) < 0.05
    assert il["batch_norm_folding_speedup"] > 0 and "Timed in alternation" in report


def test_live_tensor_peak_is_the_peak_of_allocations_plus_resident_tensors():
    """The CPU peak of live tensors: what the work allocates at its busiest plus what was alive before it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    weights = torch.nn.Linear(100, 10)  # (10*100 + 10) float32 = 4040 bytes
    state = torch.zeros(1000)  # 4000 bytes

    def work() -> float:
        a = torch.ones(250_000)  # 1 MB
        b = torch.ones(500_000)  # 2 MB: the peak is a + b
        del a
        c = torch.ones(100_000)
        return float(b.sum() + c.sum())

    peak = benchmark.live_tensor_peak(work, [weights, state])
    assert 3_000_000 + 8040 <= peak <= 3_000_000 + 8040 + 4096  # a few scalars besides
    assert benchmark.resident_bytes([weights, state, state]) == 8040  # one storage counted once

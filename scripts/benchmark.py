"""Benchmark the bundle's hot paths side by side, in one run, on whatever device is present.

Writes ``docs/benchmark.json`` (every number) and ``docs/benchmark.md`` (tables with the targets).

Cases (each run in a fresh subprocess so memory peaks do not mix):

* ``psf``: the PSF layer h (31³ parametric kernel on a 64³ patch), forward + backward, by FFT vs a
  direct ``conv3d``; and the fixed (non-blind) kernel's cached spectrum vs recomputing it.
* ``train_<mode>``: one ``CycleGANTrainer._iteration`` at the paper's settings (64³ crops, batch 1,
  ``common.json``'s full-size networks) for the proposed blind / non-blind cycleGAN and the
  conventional cycleGAN (blur = a second ``DeblurUNet`` + ``d_blurred``): time and peak memory.
* ``inference``: the full-size generator on a 128×256×256 volume through
  ``bundle.inference.Deconvolver`` — settings screened on a 128³ sub-volume, then the reference
  (64³ windows, overlap 0.25, Gaussian, batch 1: plain MONAI) and the fastest candidate on the whole
  volume, with voxels/s, the generator's achieved FLOP/s against the best FLOP/s of a bare 3×3×3
  ``conv3d`` of the same width (the practical roofline), and the PSNR change against the reference.
* ``rl``: Richardson–Lucy (30 iterations, 31³ PSF) on the same volume.
* ``ooc_*`` / ``inmem_*``: peak memory of out-of-core (``bundle.ooc``) vs in-memory inference on a
  volume and one 4× larger.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set size of the
case's own process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS after imports and
input creation (read from ``/proc/self/statm``), i.e. what the case itself added (weights, optimizer
states, activations, buffers). ``tracemalloc`` would miss torch's allocations.

Usage::

    python scripts/benchmark.py            # full run, ~15-20 min on 2 CPU cores
    python scripts/benchmark.py --quick    # smoke run (< 60 s): tiny sizes, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FULL = {
    "patch": 64,
    "kernel": 31,
    "features": (32, 32, 64, 128, 256, 32),
    "d_channels": 32,
    "volume": (128, 256, 256),
    "screen_volume": (128, 128, 128),
    "roi": 64,
    "rl_iter": 30,
    "psf_repeats": 5,
    "direct_repeats": 1,
    "train_repeats": 2,
    "screen_repeats": 1,
    "ooc_volume": (64, 128, 128),
    "ooc_large": (128, 256, 128),
    "ooc_features": (16, 16, 32, 64, 128, 16),
    "ooc_block": (64, 128, 128),
}
QUICK = {
    "patch": 32,
    "kernel": 9,
    "features": (4, 4, 8, 8, 16, 4),
    "d_channels": 4,
    "volume": (32, 32, 48),
    "screen_volume": (32, 32, 48),
    "roi": 32,
    "rl_iter": 3,
    "psf_repeats": 2,
    "direct_repeats": 1,
    "train_repeats": 1,
    "screen_repeats": 1,
    "ooc_volume": (32, 32, 32),
    "ooc_large": (64, 64, 32),
    "ooc_features": (4, 4, 8, 8, 16, 4),
    "ooc_block": (32, 32, 32),
}

TARGETS = {
    "psf_speedup": 100.0,
    "train_time_ratio": 0.5,
    "train_memory_ratio": 0.6,
    "mvoxel_per_s": 0.8,
    "roofline_fraction": 0.75,
    "psnr_tolerance_db": 0.1,
    "ooc_memory_ratio": 1.2,
}


# ----------------------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------------------


def device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median (and all) wall times of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory added by the code inside the ``with`` block (CUDA allocator, or CPU peak RSS)."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() - self.base
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
            self.method = "peak RSS (ru_maxrss) - RSS at start, fresh process"


def psnr(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    data_range = float(np.ptp(b)) if data_range is None else data_range
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


# ----------------------------------------------------------------------------------------------------------
# cases (each runs in its own process: ``--case NAME``)
# ----------------------------------------------------------------------------------------------------------


def case_psf(cfg: dict) -> dict:
    import torch.nn.functional as F

    from bundle.networks import PSFLayer
    from bundle.ops import fft_convolve

    dev = device()
    p, k = cfg["patch"], cfg["kernel"]
    layer = PSFLayer(kernel_size=(k, k, k), parameterization="parametric", na=1.0).to(dev)
    x = torch.rand(1, 1, p, p, p, device=dev)

    def fft_step() -> None:
        layer.zero_grad()
        layer(x).square().mean().backward()

    def direct_step() -> None:
        layer.zero_grad()
        h = layer.kernel()
        pads = [q for kk in reversed(h.shape) for q in ((kk - 1) - kk // 2, kk // 2)]
        y = F.conv3d(F.pad(x, pads), h.flip(0, 1, 2)[None, None])
        (layer.gain * y + layer.offset).square().mean().backward()

    fft = timed(fft_step, cfg["psf_repeats"])
    direct = timed(direct_step, cfg["direct_repeats"], warmup=0)
    # fixed (non-blind) kernel: h*x and h*G(y) per iteration; spectrum cached vs recomputed
    fixed = PSFLayer(kernel_size=(k, k, k), parameterization="fixed", init="born_wolf").to(dev)
    xs = torch.rand(2, 1, p, p, p, device=dev)
    with torch.no_grad():
        cached = timed(lambda: (fixed(xs), fixed(xs)), cfg["psf_repeats"] * 2)
        uncached = timed(lambda: [fft_convolve(xs, fixed.kernel()) for _ in range(2)], cfg["psf_repeats"] * 2)
        same = float((fixed(xs) - fixed.gain * fft_convolve(xs, fixed.kernel()) - fixed.offset).abs().max())
    return {
        "patch": p,
        "kernel": k,
        "fft_fwd_bwd_s": fft["median_s"],
        "direct_fwd_bwd_s": direct["median_s"],
        "speedup": direct["median_s"] / fft["median_s"],
        "fixed_cached_2x_s": cached["median_s"],
        "fixed_uncached_2x_s": uncached["median_s"],
        "fixed_cache_max_abs_diff": same,
        "repeats": {"fft": cfg["psf_repeats"], "direct": cfg["direct_repeats"]},
    }


def case_train(cfg: dict, mode: str) -> dict:
    from bundle.engine import CycleGANTrainer, discriminator_parameters, generator_param_groups
    from bundle.image_pool import ImagePool
    from bundle.networks import DeblurUNet, MultiScalePatchDiscriminator, PSFLayer

    dev = device()
    torch.manual_seed(0)
    p, k = cfg["patch"], cfg["kernel"]
    batch = {"sharp": torch.rand(1, 1, p, p, p), "blurred": torch.rand(1, 1, p, p, p)}
    with PeakMemory() as mem:

        def disc() -> torch.nn.Module:
            return MultiScalePatchDiscriminator(
                in_channels=1,
                channels=cfg["d_channels"],
                num_layers_d=3,
                num_scales=3,
                norm="INSTANCE",
                min_input_size=p,
            ).to(dev)

        g = DeblurUNet(features=cfg["features"]).to(dev)
        if mode == "blind":
            blur: torch.nn.Module = PSFLayer(kernel_size=(k, k, k), parameterization="parametric", na=1.0)
            d_blurred = disc()
        elif mode == "nonblind":
            blur, d_blurred = (
                PSFLayer(kernel_size=(k, k, k), parameterization="fixed", init="born_wolf"),
                None,
            )
        else:  # conventional cycleGAN: the blur generator is a second deep U-Net
            blur, d_blurred = DeblurUNet(features=cfg["features"]), disc()
        blur = blur.to(dev)
        d_sharp = disc()
        g_opt = torch.optim.Adam(
            generator_param_groups(g, blur, 1e-4, 2e-2, 1e-3), lr=1e-4, betas=(0.5, 0.999)
        )
        d_opt = torch.optim.Adam(discriminator_parameters(d_sharp, d_blurred), lr=1e-4, betas=(0.5, 0.999))
        trainer = CycleGANTrainer(
            device=dev,
            max_epochs=1,
            train_data_loader=[batch],
            g_deblur=g,
            blur=blur,
            d_sharp=d_sharp,
            d_blurred=d_blurred,
            g_optimizer=g_opt,
            d_optimizer=d_opt,
            sharp_pool=ImagePool(50, seed=0),
            blurred_pool=ImagePool(50, seed=1),
            amp=torch.cuda.is_available(),
            decollate=False,
        )
        t = timed(lambda: trainer._iteration(trainer, batch), cfg["train_repeats"])
    params = {
        "g_deblur": sum(q.numel() for q in g.parameters()),
        "blur": sum(q.numel() for q in blur.parameters() if q.requires_grad),
        "discriminators": sum(q.numel() for q in discriminator_parameters(d_sharp, d_blurred)),
    }
    return {
        "mode": mode,
        "iteration_s": t["median_s"],
        "times_s": t["times_s"],
        "peak_bytes": mem.peak,
        "memory_method": mem.method,
        "trainable_parameters": params,
    }


class Predictor(torch.nn.Module):
    """The generator with inference-only speed options (memory layout, autocast)."""

    def __init__(
        self, net: torch.nn.Module, channels_last: bool = False, autocast: str | None = None
    ) -> None:
        super().__init__()
        self.net, self.channels_last, self.autocast = net, channels_last, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(
            x.device.type, dtype=getattr(torch, self.autocast or "float32"), enabled=bool(self.autocast)
        ):
            y = self.net(x)
        return y.float().contiguous()


def _run_deconv(
    net, volume, roi, overlap, sw, mode="gaussian", inference_mode=True, channels_last=False, autocast=None
):
    from bundle.inference import Deconvolver

    dev = device()
    deconv = Deconvolver(
        Predictor(net, channels_last, autocast),
        roi_size=(roi,) * 3,
        sw_batch_size=sw,
        overlap=overlap,
        mode=mode,
        sw_device=dev,
        device="cpu",
    )
    x = torch.from_numpy(volume)[None, None]
    ctx = torch.inference_mode() if inference_mode else torch.no_grad()
    with ctx:
        return deconv(x)[0, 0].numpy()


def _simulated_volume(shape, seed=0):
    """A microtubule phantom blurred by the Born & Wolf PSF at 20 dB, normalised like inference."""
    from bundle.physics.forward import simulate_acquisition
    from bundle.physics.phantom import microtubule_phantom
    from bundle.physics.psf import born_wolf_psf

    sharp = microtubule_phantom(shape, seed=seed).astype(np.float32)
    psf = born_wolf_psf((31, 31, 31))
    blurred, _ = simulate_acquisition(sharp, psf, 20.0, seed=seed)
    lo, hi = np.percentile(blurred, [0.1, 99.9])
    return sharp, np.clip((blurred - lo) / (hi - lo), 0, 1).astype(np.float32), psf


def case_roofline(cfg: dict) -> dict:
    """Best FLOP/s of a bare 3×3×3 conv3d at the generator's first width, over layouts and batch sizes."""
    dev = device()
    width = cfg["features"][0]
    side = cfg["roi"]
    results = []
    for batch in (1, 2, 4):
        for layout in ("contiguous", "channels_last_3d", "mkldnn"):
            if layout == "mkldnn" and (dev.type != "cpu" or not torch.backends.mkldnn.is_available()):
                continue
            conv = torch.nn.Conv3d(width, width, 3, padding=1).to(dev).eval()
            x = torch.rand(batch, width, side, side, side, device=dev)
            if layout == "channels_last_3d":
                conv = conv.to(memory_format=torch.channels_last_3d)
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if layout == "mkldnn":
                from torch.utils import mkldnn as mkldnn_utils

                conv = mkldnn_utils.to_mkldnn(conv)
                x = x.to_mkldnn()
            with torch.inference_mode():
                t = timed(lambda conv=conv, x=x: conv(x), 3)
            flops = 2 * batch * side**3 * width * width * 27
            results.append(
                {"batch": batch, "layout": layout, "s": t["median_s"], "flop_per_s": flops / t["median_s"]}
            )
    best = max(results, key=lambda r: r["flop_per_s"])
    return {"width": width, "side": side, "results": results, "best": best}


def case_inference(cfg: dict, model: str | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from bundle.inference import load_network
    from bundle.networks import DeblurUNet
    from bundle.ooc import window_grid

    dev = device()
    torch.manual_seed(0)
    net = load_network(model, dev) if model else DeblurUNet(features=cfg["features"]).to(dev).eval()
    truth, volume, _ = _simulated_volume(cfg["volume"])
    screen = volume[tuple(slice(0, s) for s in cfg["screen_volume"])]
    r = cfg["roi"]
    r2 = 2 * r
    candidates = [  # (name, roi, overlap, sw_batch, inference_mode, channels_last, autocast)
        (f"reference: MONAI {r}³, overlap 0.25, batch 1, no_grad", r, 0.25, 1, False, False, None),
        (f"{r}³, overlap 0.25, batch 4, inference_mode", r, 0.25, 4, True, False, None),
        (f"{r}³, overlap 0.25, batch 4, channels_last_3d", r, 0.25, 4, True, True, None),
        (f"{r}³, overlap 0.125, batch 4", r, 0.125, 4, True, False, None),
        (f"{r2}³, overlap 0.125, batch 2", r2, 0.125, 2, True, False, None),
    ]
    half = "float16" if dev.type == "cuda" else "bfloat16"
    candidates.append((f"{r}³, overlap 0.25, batch 4, {half} autocast", r, 0.25, 4, True, False, half))

    flops_cache: dict[int, int] = {}

    def window_flops(roi: int) -> int:
        if roi not in flops_cache:
            with FlopCounterMode(display=False) as fc, torch.inference_mode():
                net(torch.rand(1, 1, roi, roi, roi, device=dev))
            flops_cache[roi] = fc.get_total_flops()
        return flops_cache[roi]

    def run(c, vol, repeats):
        name, roi, ov, sw, im, cl, ac = c
        _run_deconv(
            net, vol[: max(roi, 1), :roi, :roi].copy(), roi, ov, sw, "gaussian", im, cl, ac
        )  # warm-up
        out: dict[str, Any] = {}
        t = timed(
            lambda: out.__setitem__("y", _run_deconv(net, vol, roi, ov, sw, "gaussian", im, cl, ac)),
            repeats,
            0,
        )
        n_win = len(window_grid([max(s, roi) for s in vol.shape], (roi,) * 3, ov))
        flops = window_flops(roi) * n_win
        return {
            "name": name,
            "roi": roi,
            "overlap": ov,
            "sw_batch_size": sw,
            "inference_mode": im,
            "channels_last": cl,
            "autocast": ac,
            "seconds": t["median_s"],
            "mvoxel_per_s": vol.size / t["median_s"] / 1e6,
            "windows": n_win,
            "generator_flops": flops,
            "flop_per_s": flops / t["median_s"],
        }, out["y"]

    screened = []
    screen_ref = None
    for c in candidates:
        res, y = run(c, screen, cfg["screen_repeats"])
        if screen_ref is None:
            screen_ref = y
        res["psnr_vs_reference_output_db"] = psnr(y, screen_ref, 1.0)
        screened.append(res)
        print(f"  screen {res['name']}: {res['mvoxel_per_s']:.3f} Mvox/s", flush=True)
    best_c = max(
        (
            c
            for c, s in zip(candidates, screened)
            if s["psnr_vs_reference_output_db"] >= 35.0 or c is candidates[0]
        ),
        key=lambda c: screened[candidates.index(c)]["mvoxel_per_s"],
    )
    ref_res, ref_y = run(candidates[0], volume, 1)
    best_res, best_y = run(best_c, volume, 1) if best_c is not candidates[0] else (ref_res, ref_y)
    for res, y in ((ref_res, ref_y), (best_res, best_y)):
        res["psnr_vs_truth_db"] = psnr(y, truth, 1.0)
        res["psnr_vs_reference_output_db"] = psnr(y, ref_y, 1.0)
    return {
        "volume": list(cfg["volume"]),
        "screen_volume": list(cfg["screen_volume"]),
        "model": model or "random-init DeblurUNet (no --model given)",
        "flops_per_window": flops_cache,
        "screened": screened,
        "reference": ref_res,
        "best": best_res,
        "psnr_change_db": best_res["psnr_vs_truth_db"] - ref_res["psnr_vs_truth_db"],
    }


def case_rl(cfg: dict) -> dict:
    from bundle.classical import richardson_lucy

    _, volume, psf = _simulated_volume(cfg["volume"])
    if cfg["kernel"] < 31:
        c = 15
        psf = psf[c - cfg["kernel"] // 2 : c + cfg["kernel"] // 2 + 1][
            :, c - cfg["kernel"] // 2 : c + cfg["kernel"] // 2 + 1
        ]
        psf = psf[:, :, c - cfg["kernel"] // 2 : c + cfg["kernel"] // 2 + 1]
        psf = psf / psf.sum()
    t = timed(lambda: richardson_lucy(volume, psf, num_iter=cfg["rl_iter"], device=device()), 1, 0)
    return {
        "volume": list(cfg["volume"]),
        "iterations": cfg["rl_iter"],
        "psf": list(psf.shape),
        "seconds": t["median_s"],
        "mvoxel_per_s": volume.size / t["median_s"] / 1e6,
    }


def case_memory(cfg: dict, kind: str, path: str) -> dict:
    """Peak memory of out-of-core (``ooc``) or in-memory (``inmem``) inference on a stored volume."""
    from bundle.inference import deconvolve
    from bundle.networks import DeblurUNet
    from bundle.ooc import deconvolve_zarr, open_volume

    torch.manual_seed(0)
    net = DeblurUNet(features=cfg["ooc_features"]).eval()
    roi = (cfg["roi"],) * 3
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        t0 = time.perf_counter()
        if kind == "ooc":
            deconvolve_zarr(
                path,
                Path(tmp) / "out.ome.zarr",
                net,
                roi_size=roi,
                sw_batch_size=2,
                device="cpu",
                block_size=cfg["ooc_block"],
            )
        else:
            arr, _ = open_volume(path)
            deconvolve(np.asarray(arr[...]), net, roi_size=roi, sw_batch_size=2, device="cpu", progress=False)
        seconds = time.perf_counter() - t0
    shape = list(open_volume(path)[0].shape)
    return {
        "kind": kind,
        "shape": shape,
        "peak_bytes": mem.peak,
        "seconds": seconds,
        "memory_method": mem.method,
    }


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def dispatch(name: str, cfg: dict, args: argparse.Namespace, path: str | None = None) -> dict:
    if name == "psf":
        return case_psf(cfg)
    if name.startswith("train_"):
        return case_train(cfg, name[len("train_") :])
    if name == "roofline":
        return case_roofline(cfg)
    if name == "inference":
        return case_inference(cfg, args.model)
    if name == "rl":
        return case_rl(cfg)
    return case_memory(cfg, name.split("_")[0], path)  # ooc_small, inmem_large, ...


def run_case(name: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    """Run one case in a fresh Python process (in this process with ``--quick``); return its result."""
    if args.quick:  # smoke run: no subprocess start-up costs (memory figures then mix, as stated)
        path = extra[1] if extra else None
        return dispatch(name, QUICK, args, path)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        name,
        "--result",
        result_path,
        *(extra or []),
    ]
    if args.quick:
        cmd.append("--quick")
    if args.model:
        cmd += ["--model", args.model]
    t0 = time.perf_counter()
    print(f"[benchmark] {name} ...", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(Path(result_path).read_text())
    os.remove(result_path)
    print(f"[benchmark] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    return result


def environment() -> dict:
    dev = device()
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(0)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def ratio_line(name: str, value: float, target: str, ok: bool) -> str:
    return f"| {name} | {value} | {target} | {'yes' if ok else 'no'} |"


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    env, psf, tr, inf, rl, mem = (
        results[k] for k in ("environment", "psf", "train", "inference", "rl", "memory")
    )
    mb = 1 / 2**20
    blind, nonblind, conv = tr["blind"], tr["nonblind"], tr["conventional"]
    t_ratio = blind["iteration_s"] / conv["iteration_s"]
    m_ratio = blind["peak_bytes"] / conv["peak_bytes"]
    best, ref = inf["best"], inf["reference"]
    roof = results["roofline"]["best"]["flop_per_s"]
    frac = best["flop_per_s"] / roof
    ooc_ratio = mem["ooc_large"]["peak_bytes"] / mem["ooc_small"]["peak_bytes"]
    lines = [
        "# Benchmark",
        "",
        f"Measured by `python scripts/benchmark.py{' --quick' if results['quick'] else ''}` in one run on "
        f"{env['device']} ({env['device_name']}, {env['threads']} threads of {env['cpu_count']} CPUs, torch {env['torch']}); "
        f"load average at start {env['load_average_start'][0]:.1f}, at end {results['load_average_end'][0]:.1f} "
        "(the machine is shared with other jobs: compare ratios within this run, not absolute times). "
        f"Total {results['total_s'] / 60:.1f} min. Times are medians of the repeats listed in `benchmark.json`.",
        "",
        "## Against the targets",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        ratio_line(
            f"PSF layer {psf['kernel']}³ on {psf['patch']}³, fwd+bwd: direct conv3d / FFT",
            f"{psf['speedup']:.0f}×",
            "≥ 100×",
            psf["speedup"] >= 100,
        ),
        ratio_line(
            "training iteration time, proposed blind / conventional",
            f"{t_ratio:.2f}",
            "≤ 0.5",
            t_ratio <= 0.5,
        ),
        ratio_line(
            "training peak memory, proposed blind / conventional", f"{m_ratio:.2f}", "≤ 0.6", m_ratio <= 0.6
        ),
        ratio_line(
            f"inference {'×'.join(map(str, inf['volume']))}, best settings",
            f"{best['mvoxel_per_s']:.3f} Mvoxel/s",
            "≥ 0.8 Mvoxel/s",
            best["mvoxel_per_s"] >= 0.8,
        ),
        ratio_line("generator FLOP/s / bare conv3d roofline", f"{100 * frac:.0f} %", "≥ 75 %", frac >= 0.75),
        ratio_line(
            "PSNR change vs reference settings (vs ground truth)",
            f"{inf['psnr_change_db']:+.3f} dB",
            "within ±0.1 dB",
            abs(inf["psnr_change_db"]) <= 0.1,
        ),
        ratio_line(
            "out-of-core peak memory, 4× larger volume / volume",
            f"{ooc_ratio:.2f}",
            "≤ 1.2",
            ooc_ratio <= 1.2,
        ),
        "",
        "## PSF layer (h), forward + backward",
        "",
        "| method | time |",
        "|---|---|",
        f"| FFT (`PSFLayer`, parametric {psf['kernel']}³) | {1e3 * psf['fft_fwd_bwd_s']:.1f} ms |",
        f"| direct `conv3d` | {1e3 * psf['direct_fwd_bwd_s']:.0f} ms |",
        f"| fixed kernel, h·x twice, cached spectrum | {1e3 * psf['fixed_cached_2x_s']:.1f} ms |",
        f"| fixed kernel, h·x twice, spectrum recomputed | {1e3 * psf['fixed_uncached_2x_s']:.1f} ms |",
        "",
        "## One training iteration (`CycleGANTrainer._iteration`, batch 1)",
        "",
        "| model | time | peak memory | trainable parameters (G / blur path / discriminators) |",
        "|---|---|---|---|",
    ]
    for m in (blind, nonblind, conv):
        p = m["trainable_parameters"]
        lines.append(
            f"| {m['mode']} | {m['iteration_s']:.2f} s | {m['peak_bytes'] * mb:.0f} MiB | "
            f"{p['g_deblur'] / 1e6:.2f} M / {p['blur'] / 1e6:.4g} M / {p['discriminators'] / 1e6:.2f} M |"
        )
    lines += [
        "",
        f"Memory: {blind['memory_method']}.",
        "",
        f"## Inference ({inf['model']})",
        "",
        f"Settings screened on a {'×'.join(map(str, inf['screen_volume']))} sub-volume (PSNR of each output "
        "against the reference settings' output, in dB of a [0, 1] range):",
        "",
        "| settings | Mvoxel/s | GFLOP/s | PSNR vs reference output |",
        "|---|---|---|---|",
    ]
    for s in inf["screened"]:
        lines.append(
            f"| {s['name']} | {s['mvoxel_per_s']:.3f} | {s['flop_per_s'] / 1e9:.1f} | {s['psnr_vs_reference_output_db']:.1f} dB |"
        )
    lines += [
        "",
        f"Whole {'×'.join(map(str, inf['volume']))} volume:",
        "",
        "| settings | time | Mvoxel/s | GFLOP/s | PSNR vs truth |",
        "|---|---|---|---|---|",
        f"| {ref['name']} | {ref['seconds']:.1f} s | {ref['mvoxel_per_s']:.3f} | {ref['flop_per_s'] / 1e9:.1f} | {ref['psnr_vs_truth_db']:.2f} dB |",
        f"| best: {best['name']} | {best['seconds']:.1f} s | {best['mvoxel_per_s']:.3f} | {best['flop_per_s'] / 1e9:.1f} | {best['psnr_vs_truth_db']:.2f} dB |",
        f"| Richardson–Lucy, {rl['iterations']} iterations, PSF {'×'.join(map(str, rl['psf']))} | {rl['seconds']:.1f} s | {rl['mvoxel_per_s']:.3f} | | |",
        "",
        f"Roofline: best bare 3×3×3 conv3d at width {results['roofline']['width']} on {results['roofline']['side']}³: "
        f"{roof / 1e9:.1f} GFLOP/s (batch {results['roofline']['best']['batch']}, {results['roofline']['best']['layout']}). "
        "Generator FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` per window × windows.",
        "",
        "## Out-of-core vs in-memory inference, peak memory",
        "",
        "| volume | out-of-core (`bundle.ooc`) | in memory (`deconvolve`) |",
        "|---|---|---|",
    ]
    for size in ("small", "large"):
        o, i = mem[f"ooc_{size}"], mem[f"inmem_{size}"]
        lines.append(
            f"| {'×'.join(map(str, o['shape']))} | {o['peak_bytes'] * mb:.0f} MiB ({o['seconds']:.1f} s) | {i['peak_bytes'] * mb:.0f} MiB ({i['seconds']:.1f} s) |"
        )
    lines.append("")
    (out_dir / "benchmark.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, numbers meaningless")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder of benchmark.md / benchmark.json")
    parser.add_argument(
        "--model", default=None, help="trained generator (bundle folder / model.pt) for inference"
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL

    if args.case:  # inside a case's own process
        res = dispatch(args.case, cfg, args, args.path)
        Path(args.result).write_text(json.dumps(res))
        return

    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "quick": args.quick,
        "environment": environment(),
        "settings": cfg,
        "targets": TARGETS,
    }
    results["psf"] = run_case("psf", args)
    results["train"] = {m: run_case(f"train_{m}", args) for m in ("blind", "nonblind", "conventional")}
    results["roofline"] = run_case("roofline", args)
    results["inference"] = run_case("inference", args)
    results["rl"] = run_case("rl", args)
    from bundle.ooc import write_ome_zarr

    results["memory"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for size, shape in (("small", cfg["ooc_volume"]), ("large", cfg["ooc_large"])):
            path = str(Path(tmp) / f"{size}.ome.zarr")
            write_ome_zarr(path, rng.gamma(2.0, 50.0, size=shape).astype(np.float32), chunks=cfg["ooc_block"])
            for kind in ("ooc", "inmem"):
                results["memory"][f"{kind}_{size}"] = run_case(f"{kind}_{size}", args, ["--path", path])
    results["total_s"] = time.perf_counter() - t0
    results["load_average_end"] = list(os.getloadavg())
    write_report(results, Path(args.out))
    print((Path(args.out) / "benchmark.md").read_text())


if __name__ == "__main__":
    main()

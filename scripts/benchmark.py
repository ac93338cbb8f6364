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

    python scripts/benchmark.py            # full run, ~35 min on 2 CPU cores (default generator)
    python scripts/benchmark.py --quick    # smoke run (< 60 s): tiny sizes, numbers meaningless
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bundle.io import atomic_write_text  # noqa: E402

FULL = {
    "patch": 64,
    "kernel": 31,
    "d_channels": 32,
    "volume": (128, 256, 256),
    "roi": 64,
    "rl_iter": 30,
    "psf_repeats": 5,
    "direct_repeats": 1,
    "train_repeats": 2,
    "inference_repeats": 2,
    "interleaved_rounds": 5,
    "ooc_volume": (64, 128, 128),
    "ooc_large": (128, 256, 256),
    "ooc_block": (32, 64, 64),
    "dask_chunks": (64, 128, 128),
    "dask_sizes": ((64, 256, 256), (128, 256, 256)),
}
QUICK = {
    "patch": 32,
    "kernel": 9,
    "d_channels": 4,
    "volume": (32, 32, 48),
    "roi": 32,
    "rl_iter": 3,
    "psf_repeats": 2,
    "direct_repeats": 1,
    "train_repeats": 1,
    "inference_repeats": 1,
    "interleaved_rounds": 2,
    "ooc_volume": (32, 32, 32),
    "ooc_large": (64, 64, 32),
    "ooc_block": (32, 32, 32),
    "dask_chunks": (32, 32, 32),
    "dask_sizes": ((32, 64, 64), (64, 64, 64)),
}

_COMMON = json.loads((ROOT / "configs" / "common.json").read_text())
GENERATORS = {
    # the generator configs/common.json builds (its keys read here, so the benchmark follows the default);
    # "small" is the out-of-core memory cases' narrower one, "quick" the smoke run's
    "default": {
        "full": {
            "features": tuple(_COMMON["generator_features"]),
            "depth": _COMMON["generator_depth"],
            "norm": _COMMON["generator_norm"],
            "align_corners": _COMMON["generator_align_corners"],
            "last_bias": _COMMON["generator_last_bias"],
        },
        "small": {"features": (16, 32, 64, 16)},
        "quick": {"features": (4, 8, 16, 4)},
    },
    # the paper's generator (MONAI's BasicUNet: 4 poolings, InstanceNorm; the default until 2026-11-30)
    "paper": {
        "full": {"features": (32, 32, 64, 128, 256, 32), "depth": 4, "norm": "instance", "align_corners": True},
        "small": {"features": (16, 16, 32, 64, 128, 16)},
        "quick": {"features": (4, 4, 8, 8, 16, 4)},
    },
}


def settings(quick: bool, generator: str) -> dict:
    """The sizes (``QUICK`` or ``FULL``) with the ``DeblurUNet`` keyword arguments of ``generator``
    (``GENERATORS``): ``cfg["generator"]`` for training, inference, the roofline and dask,
    ``cfg["ooc_generator"]`` for the out-of-core memory cases, ``cfg["dask_generator"]`` (the default's: the dask
    path needs a window-free generator) for dask."""
    g = GENERATORS[generator]
    full = g["full"]
    cfg = dict(QUICK if quick else FULL, generator_name=generator)
    cfg["generator"] = {**full, **g["quick"]} if quick else dict(full)
    cfg["ooc_generator"] = {**full, **(g["quick"] if quick else g["small"])}
    default = GENERATORS["default"]["full"]  # dask needs a window-free generator: always the default
    cfg["dask_generator"] = {**default, **GENERATORS["default"]["quick"]} if quick else dict(default)
    return cfg


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


class SampledPeakMemory:
    """Peak memory added inside the ``with`` block, for several blocks in one process.

    CUDA: the allocator's peak. CPU: RSS sampled every 5 ms by a thread (``ru_maxrss`` is a
    process-lifetime maximum, useless for the second block); a peak shorter than 5 ms can be missed.
    """

    def __enter__(self) -> SampledPeakMemory:
        import threading

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.top = rss_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.top = max(self.top, rss_bytes())
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.top, rss_bytes()) - self.base


def live_tensor_peak(fn: Callable[[], Any], resident: Iterable[Any] = ()) -> int:
    """Peak bytes of live tensors while ``fn`` runs on the CPU (weights, gradients, optimizer states,
    activations): the CPU counterpart of ``torch.cuda.max_memory_allocated``, free of the C allocator's
    slack and reuse policy that peak RSS includes.

    One extra run under ``torch.profiler`` with ``profile_memory``: the running sum of its raw allocation
    events (``[memory]``, +bytes on allocation, -bytes on free) gives the peak of what ``fn`` allocates
    beyond what was alive before; the tensors of ``resident`` (modules: parameters, gradients and
    buffers; optimizers: their states; tensors) are added as the memory alive when ``fn`` starts.
    Written by hand because the profiler's categorised memory timeline, which gives the same number,
    is deprecated and took 40 % of the quick benchmark's time (it walks every allocation's stack).

    Args:
        fn: the work to measure (e.g. one training iteration).
        resident: what is alive before ``fn`` and counts towards its peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak + resident_bytes(resident)


def resident_bytes(objects: Iterable[Any]) -> int:
    """Bytes of distinct tensor storages held by modules (parameters, their gradients, buffers),
    optimizers (states) and tensors; anything else (e.g. ``None``) holds none."""
    tensors: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
            tensors += [q.grad for q in obj.parameters() if q.grad is not None]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
        elif torch.is_tensor(obj):
            tensors.append(obj)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type == "cpu"}
    return int(sum(storages.values()))


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
    layer = PSFLayer.build(kernel_size=(k, k, k), parameterization="parametric", na=1.0).to(dev)
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
    fixed = PSFLayer.build(kernel_size=(k, k, k), parameterization="fixed", init="born_wolf").to(dev)
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


def case_train(cfg: dict, mode: str, allocator: str = "system") -> dict:
    """One training iteration; ``allocator``: the malloc policy around it (``MallocPolicy`` in training).

    ``mode``: ``blind``, ``nonblind`` (the product's non-blind default: blurred-cycle weight 0, so the trainer
    skips h*G(y)), ``nonblindpaper`` (the paper's non-blind model: blurred cycle on) or ``conventional``.
    """
    from bundle.allocator import malloc_policy
    from bundle.engine import CycleGANTrainer, discriminator_parameters, generator_param_groups
    from bundle.image_pool import ImagePool
    from bundle.losses import CycleLoss
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

        g = DeblurUNet(**cfg["generator"]).to(dev)
        if mode == "blind":
            blur: torch.nn.Module = PSFLayer.build(kernel_size=(k, k, k), parameterization="parametric", na=1.0)
            d_blurred = disc()
        elif mode in ("nonblind", "nonblindpaper"):
            blur, d_blurred = (
                PSFLayer.build(kernel_size=(k, k, k), parameterization="fixed", init="born_wolf"),
                None,
            )
        else:  # conventional cycleGAN: the blur generator is a second deep U-Net
            blur, d_blurred = DeblurUNet(**cfg["generator"]), disc()
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
            blurred_cycle_loss=CycleLoss(weight=0.0) if mode == "nonblind" else None,
        )
        with malloc_policy(allocator):
            t = timed(lambda: trainer._iteration(trainer, batch), cfg["train_repeats"])
    if dev.type == "cuda":  # the allocator's peak already counts live tensors only
        live, live_method = mem.peak, mem.method
    else:
        with malloc_policy(allocator):
            resident = [g, blur, d_sharp, d_blurred, g_opt, d_opt, *batch.values()]  # d_blurred None: skipped
            live = live_tensor_peak(lambda: trainer._iteration(trainer, batch), resident)
        live_method = "torch.profiler allocation events (CPU), one more iteration, + weights/gradients/optimizer states"
    params = {
        "g_deblur": sum(q.numel() for q in g.parameters()),
        "blur": sum(q.numel() for q in blur.parameters() if q.requires_grad),
        "discriminators": sum(q.numel() for q in discriminator_parameters(d_sharp, d_blurred)),
    }
    return {
        "mode": mode,
        "allocator": allocator,
        "iteration_s": t["median_s"],
        "times_s": t["times_s"],
        "peak_bytes": mem.peak,
        "memory_method": mem.method,
        "peak_live_bytes": live,
        "live_memory_method": live_method,
        "trainable_parameters": params,
    }


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
    """Best FLOP/s of a bare 3×3×3 conv3d at the generator's first width, over layouts, batch sizes
    and precisions (float32, and bfloat16 on the CPU / float16 on CUDA)."""
    dev = device()
    width = cfg["generator"]["features"][0]
    side = cfg["roi"]
    half = torch.float16 if dev.type == "cuda" else torch.bfloat16
    results = []
    for dtype in (torch.float32, half):
        for batch in (1, 2, 4):
            for layout in ("contiguous", "channels_last_3d"):
                conv = torch.nn.Conv3d(width, width, 3, padding=1).to(dev, dtype).eval()
                x = torch.rand(batch, width, side, side, side, device=dev, dtype=dtype)
                if layout == "channels_last_3d":
                    conv = conv.to(memory_format=torch.channels_last_3d)
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                with torch.inference_mode():
                    t = timed(lambda conv=conv, x=x: conv(x), 3)
                flops = 2 * batch * side**3 * width * width * 27
                results.append(
                    {
                        "dtype": str(dtype).replace("torch.", ""),
                        "batch": batch,
                        "layout": layout,
                        "s": t["median_s"],
                        "flop_per_s": flops / t["median_s"],
                    }
                )
    best = max(results, key=lambda r: r["flop_per_s"])
    by_dtype = {
        d: max((r for r in results if r["dtype"] == d), key=lambda r: r["flop_per_s"])
        for d in {r["dtype"] for r in results}
    }
    return {"width": width, "side": side, "results": results, "best": best, "best_by_dtype": by_dtype}


def _affine_psnr(prediction: np.ndarray, truth: np.ndarray) -> float:
    """PSNR against the ground truth after the least-squares affine fit (``bundle.metrics``, as in evaluate)."""
    from bundle.metrics import affine_fit
    from bundle.metrics import psnr as metric_psnr

    p, t = torch.from_numpy(prediction).double(), torch.from_numpy(truth).double()
    return metric_psnr(affine_fit(p, t), t)


def _halo_window(net: torch.nn.Module, side: int) -> int:
    """A window side for ``side`` kept voxels: ``side`` plus ``net``'s ``tiling_halo`` on each face, rounded up
    to its ``divisor`` (``side`` rounded up for a generator without a halo, as the paper's)."""
    halo, div = int(getattr(net, "tiling_halo", 0)), int(getattr(net, "divisor", 16))
    return -(-(side + 2 * halo) // div) * div


def _inference_inputs(cfg: dict, model: str | None) -> tuple:
    """What the inference cases share: ``(dev, net, truth, volume, half, overlap)`` — the trained generator
    (or a seeded random one), the simulated volume and its truth, the device's half precision and the
    planner's overlap (the paper's 16 voxels at 64³)."""
    from bundle.inference import load_network
    from bundle.networks import DeblurUNet

    dev = device()
    torch.manual_seed(0)
    net = load_network(model, dev) if model else DeblurUNet(**cfg["generator"]).to(dev).eval()
    truth, volume, _ = _simulated_volume(cfg["volume"])
    half = "float16" if dev.type == "cuda" else "bfloat16"
    return dev, net, truth, volume, half, max(int(cfg["roi"] * 0.25), 1)


def case_inference(cfg: dict, model: str | None) -> dict:
    """The generator on the whole volume: the plain MONAI reference and ``Deconvolver`` settings.

    Every setting runs on the whole volume (no screening on a sub-volume: the fast settings take
    seconds), and each output is scored against the ground truth, so the PSNR change against the
    reference is measured, not assumed (InstanceNorm statistics depend on the window).
    """
    from monai.inferers import SlidingWindowInferer
    from torch.utils.flop_counter import FlopCounterMode

    from bundle.inference import Deconvolver, resolve_precision
    from bundle.ooc import window_grid

    dev, net, truth, volume, half, ov = _inference_inputs(cfg, model)
    r = cfg["roi"]
    # one pass over the volume mirror-padded by the halo that Deconvolver adds (0 for the paper's generator)
    halo = int(getattr(net, "tiling_halo", 0))
    whole = int(np.prod([_halo_window(net, s) for s in cfg["volume"]]))
    # fixed windows: r³ blended with overlap 0.25 (the paper's), or, for a generator with a halo, r³ cores
    # plus the halo on each face (r³ windows would keep only (r - 2·halo)³ of each)
    w, wb = (_halo_window(net, r), 1) if halo else (r, 4)
    fixed = f"{w}³ ({r}³ cores + {halo}-voxel halo), batch {wb}" if halo else f"{r}³, overlap 0.25, batch 4"
    candidates = [  # (name, Deconvolver kwargs); None = the plain MONAI reference
        (f"reference: plain MONAI SlidingWindowInferer {r}³, overlap 0.25, batch 1, no_grad, float32", None),
        # right after the reference, before any "reuse" row: glibc's thresholds are process-wide, and a
        # "reuse" call leaves them at their fixed steady state rather than the default's dynamic one
        (f"auto window (default budget), {half}, glibc's default allocator (allocator='system')",
         {"roi_size": "auto", "auto_overlap": ov, "auto_min_size": r, "precision": half, "allocator": "system"}),
        (f"{fixed}, optimised network, float32", {"roi_size": (w,) * 3, "sw_batch_size": wb}),
        (f"{fixed}, optimised network, {half}", {"roi_size": (w,) * 3, "sw_batch_size": wb, "precision": half}),
        # fewer windows of the same size: no overlap along z (128 = 2 windows instead of 3); with a halo the
        # windows' cores tile the volume without overlap already
        *[(f"{r}³, overlap 0 along z, 0.25 along y, x, batch 4, {half}",
           {"roi_size": (r,) * 3, "sw_batch_size": 4, "precision": half, "overlap": [0.0, 0.25, 0.25]})][: int(not halo)],
        ("auto window (default budget), float32", {"roi_size": "auto", "auto_overlap": ov, "auto_min_size": r}),
        (f"auto window (default budget), {half}", {"roi_size": "auto", "auto_overlap": ov, "auto_min_size": r, "precision": half}),
        (f"auto window, whole volume in one pass, {half}",
         {"roi_size": "auto", "auto_overlap": ov, "auto_min_size": r, "precision": half, "max_pass_voxels": whole}),
    ]
    flops_cache: dict[str, float] = {}

    def window_flops(roi: tuple) -> int:
        """FLOPs of one window: counted on an r³ window and scaled by volume (exact: every layer's work
        is proportional to its voxels for sides divisible by the generator's ``divisor``, 2**depth), so no
        full-size window is run under the counter (its float32 copies took 12 GiB)."""
        if not flops_cache:
            with FlopCounterMode(display=False) as fc, torch.inference_mode():
                net(torch.rand(1, 1, r, r, r, device=dev))
            flops_cache["per_voxel"] = fc.get_total_flops() / r**3
        assert all(side % getattr(net, "divisor", 16) == 0 for side in roi), roi
        return int(round(flops_cache["per_voxel"] * int(np.prod(roi))))

    x = torch.from_numpy(volume)[None, None]
    rows = []
    outputs: dict[str, np.ndarray] = {}
    for name, kwargs in candidates:
        if kwargs is None:
            inferer = SlidingWindowInferer((r,) * 3, sw_batch_size=1, overlap=0.25, mode="gaussian", sw_device=dev, device="cpu")

            def fn(inferer=inferer):
                with torch.no_grad():
                    return inferer(x, net)

            roi, overlap = (r,) * 3, [0.25] * 3
        else:
            # the rows measure the command line's setting (configs/inference.json: "reuse") unless they say
            kwargs = {"allocator": "reuse", **kwargs}
            deconv = Deconvolver(net, mode="gaussian", sw_device=dev, device="cpu", **kwargs)

            def fn(deconv=deconv):
                with torch.no_grad():
                    return deconv(x)

        times = []
        repeats = cfg["inference_repeats"] if kwargs is not None else 1
        if kwargs is None:  # warm-up: one window (the reference is slow and has nothing to build)
            with torch.no_grad():
                net(x[..., :r, :r, :r].to(dev))
        else:
            fn()  # warm-up (and the converted network is built)
        gc.collect()
        with SampledPeakMemory() as mem:
            for _ in range(repeats):
                t0 = time.perf_counter()
                y = fn()
                sync()
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        if kwargs is not None:
            roi = tuple(deconv.last_roi_size)
            overlap = deconv.inferer_for(x.shape[2:])[1].overlap
        overlap = [float(o) for o in np.broadcast_to(overlap, (3,))]
        n_win = len(window_grid([max(v, q) for v, q in zip(volume.shape, roi)], roi, overlap))
        flops = window_flops(roi) * n_win
        out = y[0, 0].float().numpy()
        outputs[name] = out
        row = {
            "name": name,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (kwargs or {}).items()},
            "precision": resolve_precision((kwargs or {}).get("precision", "float32"), dev),
            "roi": list(roi),
            "windows": n_win,
            "computed_voxels_per_voxel": n_win * float(np.prod(roi)) / volume.size,
            "seconds": seconds,
            "times_s": times,
            "mvoxel_per_s": volume.size / seconds / 1e6,
            "generator_flops": flops,
            "flop_per_s": flops / seconds,
            "psnr_vs_truth_db": _affine_psnr(out, truth),
            "peak_memory_bytes": mem.peak,
        }
        rows.append(row)
        print(f"  {name}: {row['seconds']:.1f} s, {row['mvoxel_per_s']:.3f} Mvox/s, {row['psnr_vs_truth_db']:.2f} dB", flush=True)
    ref = rows[0]
    for row in rows:
        row["psnr_change_db"] = row["psnr_vs_truth_db"] - ref["psnr_vs_truth_db"]
        row["psnr_vs_reference_output_db"] = psnr(outputs[row["name"]], outputs[ref["name"]], 1.0)
    tol = TARGETS["psnr_tolerance_db"]
    best = max((row for row in rows if abs(row["psnr_change_db"]) <= tol), key=lambda row: row["mvoxel_per_s"])
    best_not_worse = max((row for row in rows if row["psnr_change_db"] >= -tol), key=lambda row: row["mvoxel_per_s"])
    return {
        "volume": list(cfg["volume"]),
        "model": model or "random-init DeblurUNet (no --model given: PSNR against the truth is meaningless)",
        "rows": rows,
        "reference": ref,
        "best": best,
        "best_not_worse": best_not_worse,
        "psnr_change_db": best["psnr_change_db"],
        "memory_method": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "RSS sampled every 5 ms",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def case_interleaved(cfg: dict, model: str | None) -> dict:
    """Default ``Deconvolver`` settings (planned windows, fastest precision) against two variants, timed in
    alternation (round k runs every variant once) so that the process's state (heap, page cache, the
    machine's other load) weighs on each alike: batch norm kept as layers instead of folded into the
    convolutions, and a 4x larger ``max_pass_voxels``. Sequential rows, as in the inference case, ran
    up to 1.7x apart for the same network depending on what ran before them."""
    from bundle.inference import Deconvolver, InferenceNetwork

    dev, net, truth, volume, half, ov = _inference_inputs(cfg, model)
    x = torch.from_numpy(volume)[None, None]
    settings = {"mode": "gaussian", "sw_device": dev, "device": "cpu", "roi_size": "auto", "auto_overlap": ov,
                "auto_min_size": cfg["roi"], "precision": half}
    default = Deconvolver(net, **settings)
    kept = Deconvolver(net, **settings)
    kept.predictor = InferenceNetwork(net, half, fold_batch_norm=False)  # Deconvolver has no switch for it
    variants = {
        "default": default,
        "batch_norm_kept": kept,
        "budget_x4": Deconvolver(net, **settings, max_pass_voxels=4 * default.max_pass_voxels),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, int] = {}
    psnrs: dict[str, float] = {}
    with torch.no_grad():
        for name, deconv in variants.items():  # warm-up, memory and output
            with SampledPeakMemory() as mem:
                y = deconv(x)
            peaks[name], psnrs[name] = mem.peak, _affine_psnr(y[0, 0].float().numpy(), truth)
        for _ in range(cfg["interleaved_rounds"]):
            for name, deconv in variants.items():
                t0 = time.perf_counter()
                deconv(x)
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "volume": list(cfg["volume"]),
        "precision": half,
        "times_s": times,
        "seconds": med,
        "mvoxel_per_s": {k: volume.size / v / 1e6 for k, v in med.items()},
        "peak_memory_bytes": peaks,
        "psnr_vs_truth_db": psnrs,
        "roi": {k: list(v.last_roi_size) for k, v in variants.items()},
        "batch_norm_folding_speedup": med["batch_norm_kept"] / med["default"],
        "budget_x4_speedup": med["default"] / med["budget_x4"],
    }


def case_rl(cfg: dict) -> dict:
    """Richardson–Lucy: the bundle's (zero boundary, the simulator's model) against scikit-image's
    ``richardson_lucy(clip=False)`` on the same volume, PSF and iterations, timed in this process;
    PSNR of each against the truth after the affine fit of the evaluation."""
    from bundle.classical import richardson_lucy
    from bundle.metrics import affine_fit

    sharp, volume, psf = _simulated_volume(cfg["volume"])
    if cfg["kernel"] < 31:
        c, h = 15, cfg["kernel"] // 2
        psf = psf[c - h : c + h + 1, c - h : c + h + 1, c - h : c + h + 1]
        psf = psf / psf.sum()
    n = cfg["rl_iter"]

    def ours():
        return richardson_lucy(volume, psf, num_iter=n, pad_mode="zeros", device=device())

    def score(out) -> float:
        t = torch.as_tensor(sharp, dtype=torch.float64)
        fitted = affine_fit(torch.as_tensor(np.asarray(out), dtype=torch.float64)[None], t[None])[0]
        return float(10 * torch.log10(1.0 / ((fitted - t) ** 2).mean()))

    # warm both with one iteration (FFT plans, thread pools, first-call imports), then time one run each
    richardson_lucy(volume, psf, num_iter=1, pad_mode="zeros", device=device())
    t = timed(ours, 1, 0)
    row = {
        "volume": list(cfg["volume"]),
        "iterations": n,
        "psf": list(psf.shape),
        "seconds": t["median_s"],
        "mvoxel_per_s": volume.size / t["median_s"] / 1e6,
        "psnr_db": score(ours()),
    }
    try:
        from skimage.restoration import richardson_lucy as skimage_rl
    except ImportError:  # scikit-image is a dev extra
        return row
    skimage_rl(volume, psf, num_iter=1, clip=False)
    ts = timed(lambda: skimage_rl(volume, psf, num_iter=n, clip=False), 1, 0)
    row.update(
        skimage_seconds=ts["median_s"],
        skimage_psnr_db=score(skimage_rl(volume, psf, num_iter=n, clip=False)),
        speedup_vs_skimage=ts["median_s"] / t["median_s"],
    )
    return row


def case_memory(cfg: dict, kind: str, path: str) -> dict:
    """Peak memory of out-of-core (``ooc``) or in-memory (``inmem``) inference on a stored volume."""
    from bundle.inference import deconvolve
    from bundle.networks import DeblurUNet
    from bundle.ooc import deconvolve_zarr, open_volume

    torch.manual_seed(0)
    net = DeblurUNet(**cfg["ooc_generator"]).eval()
    # windows of roi³ cores plus the halo, as in inference
    roi = (_halo_window(net, cfg["roi"]) if net.tiling_halo else cfg["roi"],) * 3
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
            deconvolve(np.asarray(arr[...]), net, roi_size=roi, sw_batch_size=2, device="cpu", progress=False, flips=1)
        seconds = time.perf_counter() - t0
    shape = list(open_volume(path)[0].shape)
    return {
        "kind": kind,
        "shape": shape,
        "peak_bytes": mem.peak,
        "seconds": seconds,
        "memory_method": mem.method,
    }


def case_dask(cfg: dict) -> dict:
    """``bundle.ooc.deconvolve_dask`` on a ``LocalCluster``: per-worker peak RSS on two stack sizes
    (1 worker each) and the time of 1 vs 2 workers on the larger stack (each worker one thread)."""
    import resource

    from distributed import Client, LocalCluster

    from bundle.networks import DeblurUNet
    from bundle.ooc import deconvolve_dask, write_ome_zarr

    torch.manual_seed(0)
    net = DeblurUNet(**cfg["dask_generator"]).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model.pt")
        torch.save(net.state_dict(), model)
        rng = np.random.default_rng(0)
        stacks = []
        for i, shape in enumerate(cfg["dask_sizes"]):
            path = str(Path(tmp) / f"stack{i}.ome.zarr")
            write_ome_zarr(path, rng.gamma(2.0, 50.0, size=shape).astype(np.float32), chunks=cfg["dask_chunks"])
            stacks.append((shape, path))
        runs = [(shape, path, 1) for shape, path in stacks] + [(stacks[-1][0], stacks[-1][1], 2)]
        for k, (shape, path, workers) in enumerate(runs):
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              env=env) as cluster, Client(cluster) as client:  # fmt: skip
                client.run(lambda: __import__("torch").set_num_threads(1))
                t0 = time.perf_counter()
                deconvolve_dask(path, Path(tmp) / f"out{k}.ome.zarr", model, chunks=cfg["dask_chunks"], scheduler=client)
                seconds = time.perf_counter() - t0
                peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            rows.append({"shape": list(shape), "workers": workers, "seconds": seconds,
                         "worker_peak_bytes": max(peaks.values())})  # fmt: skip
    return {"rows": rows, "chunks": list(cfg["dask_chunks"]), "generator": cfg["dask_generator"],
            "speedup_2_vs_1": rows[1]["seconds"] / rows[2]["seconds"]}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------


def dispatch(name: str, cfg: dict, args: argparse.Namespace, path: str | None = None) -> dict:
    if name == "psf":
        return case_psf(cfg)
    if name.startswith("train_"):  # train_<mode>[_<allocator>]
        mode, _, allocator = name[len("train_") :].partition("_")
        return case_train(cfg, mode, allocator or "system")
    if name == "roofline":
        return case_roofline(cfg)
    if name == "inference":
        return case_inference(cfg, args.model)
    if name == "interleaved":
        return case_interleaved(cfg, args.model)
    if name == "rl":
        return case_rl(cfg)
    if name == "dask":
        return case_dask(cfg)
    return case_memory(cfg, name.split("_")[0], path)  # ooc_small, inmem_large, ...


def run_case(name: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    """Run one case in a fresh Python process (in this process with ``--quick``); return its result."""
    if args.quick:  # smoke run: no subprocess start-up costs (memory figures then mix, as stated)
        path = extra[1] if extra else None
        return dispatch(name, settings(True, args.generator), args, path)
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
    cmd += ["--generator", args.generator]
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
    atomic_write_text(out_dir / "benchmark.json", json.dumps(results, indent=2))
    env, psf, tr, inf, rl, mem = (
        results[k] for k in ("environment", "psf", "train", "inference", "rl", "memory")
    )
    mb = 1 / 2**20
    gen, gen_name = results["settings"]["generator"], results["settings"]["generator_name"]
    blind, nonblind, conv = tr["blind"], tr["nonblind"], tr["conventional"]
    t_ratio = blind["iteration_s"] / conv["iteration_s"]
    m_ratio = blind["peak_bytes"] / conv["peak_bytes"]
    live_ratio = blind["peak_live_bytes"] / conv["peak_live_bytes"]
    best, ref = inf["best"], inf["reference"]
    fast = inf["best_not_worse"]
    roof = results["roofline"]["best"]["flop_per_s"]
    vol = "×".join(map(str, inf["volume"]))
    ooc_ratio = mem["ooc_large"]["peak_bytes"] / mem["ooc_small"]["peak_bytes"]
    lines = [
        "# Benchmark",
        "",
        f"Measured by `python scripts/benchmark.py{' --quick' if results['quick'] else ''}"
        f"{'' if gen_name == 'default' else ' --generator paper'}` in one run on "
        f"{env['device']} ({env['device_name']}, {env['threads']} threads of {env['cpu_count']} CPUs, torch {env['torch']}); "
        f"load average at start {env['load_average_start'][0]:.1f}, at end {results['load_average_end'][0]:.1f} "
        "(the machine is shared with other jobs: compare ratios within this run, not absolute times). "
        f"Total {results['total_s'] / 60:.1f} min. Times are medians of the repeats listed in `benchmark.json`.",
        "",
        f"Generator: `{gen_name}`, `DeblurUNet("
        + ", ".join(f"{k}={v}" for k, v in gen.items())
        + ")`"
        + (" (as `configs/common.json` builds it)" if gen_name == "default" else "")
        + f"; `--generator` chooses it, `{inf['model']}` ran the inference case.",
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
            f"training peak memory (live tensors: {blind['live_memory_method']}), proposed blind / conventional",
            f"{live_ratio:.3f}",
            "≤ 0.6",
            live_ratio <= 0.6,
        ),
        ratio_line(
            f"the same in peak memory ({blind['memory_method']})",
            f"{m_ratio:.3f}",
            "≤ 0.6",
            m_ratio <= 0.6,
        ),
        *[
            line
            for label, row in (
                ("within ±0.1 dB of the reference", best),
                ("not worse than the reference by more than 0.1 dB", fast),
            )
            for line in (
                ratio_line(
                    f"inference {vol}, fastest setting {label} ({row['precision']}, "
                    f"{'×'.join(map(str, row['roi']))} windows)",
                    f"{row['mvoxel_per_s']:.2f} Mvoxel/s ({row['psnr_change_db']:+.3f} dB)",
                    "≥ 0.8 Mvoxel/s",
                    row["mvoxel_per_s"] >= 0.8,
                ),
                ratio_line(
                    "its generator FLOP/s / bare conv3d roofline",
                    f"{100 * row['flop_per_s'] / roof:.0f} %",
                    "≥ 75 %",
                    row["flop_per_s"] / roof >= 0.75,
                ),
            )
        ],
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
        "| model | time | peak live tensors | peak memory (RSS on the CPU) | trainable parameters (G / blur path / discriminators) |",
        "|---|---|---|---|---|",
    ]
    paper = tr.get("nonblindpaper", nonblind)  # reports from before the non-blind default changed lack it
    names = {"nonblind": "non-blind (default: no blurred cycle)", "nonblindpaper": "non-blind, the paper's blurred cycle"}
    for m in (blind, nonblind, *([paper] if paper is not nonblind else []), conv,
              *(tr[k] for k in ("blind_reuse", "conventional_reuse") if k in tr)):
        p = m["trainable_parameters"]
        label = names.get(m["mode"], m["mode"]) + (f", allocator `{m['allocator']}`" if m.get("allocator", "system") != "system" else "")
        lines.append(
            f"| {label} | {m['iteration_s']:.2f} s | {m['peak_live_bytes'] * mb:.0f} MiB | {m['peak_bytes'] * mb:.0f} MiB | "
            f"{p['g_deblur'] / 1e6:.2f} M / {p['blur'] / 1e6:.4g} M / {p['discriminators'] / 1e6:.2f} M |"
        )
    d_one = blind["iteration_s"] - paper["iteration_s"]  # d_blurred's passes (and the PSF's NA gradient)
    f_extra = conv["iteration_s"] - blind["iteration_s"]  # the second U-Net's passes minus the PSF layer's
    lines += [
        "",
        "Why the time ratio sits at 0.5: per iteration the proposed model runs G forward and backward once per "
        "cycle (twice), the conventional cycleGAN runs G *and* its blur U-Net F (the same network) twice each, "
        "and both train the same two discriminators, so with P_G, P_h, P_D the costs of G, h and the "
        "discriminators, blind / conventional ≈ (P_G + P_h + P_D) / (2 P_G + P_D), just above 1/2; only the "
        "conventional model's extra overheads (two U-Net graphs, their optimiser state and memory traffic) push "
        f"it below. Measured here: one discriminator (blind − non-blind with the paper's blurred cycle) "
        f"{d_one:.2f} s, F's passes (conventional − blind) {f_extra:.2f} s. On a shared machine a ratio this "
        "close to 0.5 can land on either side of the target from run to run: read it with its repeats in "
        "`benchmark.json`."
        + (
            f" The non-blind default skips h*G(y) (its blurred-cycle weight is 0): "
            f"{paper['iteration_s'] - nonblind['iteration_s']:+.3f} s per iteration against the paper's "
            "non-blind model; G(y) itself is still needed by the adversarial term, so it can save at most one "
            "FFT blur forward and backward."
            if paper is not nonblind
            else ""
        ),
        "",
        *(
            [
                "Allocator: the target rows run with glibc's default malloc settings; the training configs attach "
                "`bundle.handlers.MallocPolicy(\"reuse\")` (`train_allocator`), which keeps freed activations for "
                "the next iteration instead of re-faulting fresh pages: "
                f"blind {blind['iteration_s'] / tr['blind_reuse']['iteration_s']:.2f}× and conventional "
                f"{conv['iteration_s'] / tr['conventional_reuse']['iteration_s']:.2f}× faster in this run (ratio "
                f"{tr['blind_reuse']['iteration_s'] / tr['conventional_reuse']['iteration_s']:.2f}), for more resident "
                "memory (the RSS column); live tensors are the same.",
                "",
            ]
            if "blind_reuse" in tr and "conventional_reuse" in tr
            else []
        ),
        f"Memory: peak live tensors ({blind['live_memory_method']}) is what the model needs (on CUDA it is "
        "`torch.cuda.max_memory_allocated`); peak memory ("
        f"{blind['memory_method']}) adds the C allocator's slack (freed buffers not yet returned "
        "to the OS) and varies by ±60 MiB from run to run. Both trainers backpropagate the two cycles one after the other, so one "
        "cycle's graph is alive at a time (G's in the proposed model, G's or F's in the conventional one); the "
        "parts both models share weigh more in the smaller total: parameters with gradients and Adam moments alone "
        + ", ".join(
            f"{m['mode']} {16 * sum(m['trainable_parameters'].values()) / 2**20:.0f} MiB" for m in (blind, conv)
        )
        + ", most of it the two discriminators'.",
        "",
        f"## Inference ({inf['model']})",
        "",
        f"Every setting on the whole {'×'.join(map(str, inf['volume']))} volume (simulated: microtubules, Born & Wolf "
        "PSF, 20 dB). PSNR against the ground truth after the least-squares affine fit (as `configs/evaluate.json`); "
        "the change is against the reference. **best ±0.1**: the fastest row within ±0.1 dB of it; "
        "**fastest ≥ −0.1**: the fastest row not worse than it by more than 0.1 dB ("
        + (
            "larger windows change the InstanceNorm statistics, and with them the output"
            if gen["norm"] == "instance"
            else "the reference's plain windows see zeros beyond their borders; `Deconvolver` pads each window by "
            "the generator's halo, so its rows differ only by precision"
        )
        + "). \"computed\" = voxels the generator computes per "
        f"output voxel (window overlap); memory = {inf['memory_method']}, added during the run (after a warm-up "
        "call). `Deconvolver` rows use its default malloc policy `allocator=\"reuse\"` (`bundle.allocator`: freed "
        "activations kept for the next window, the heap trimmed after the call) unless marked `system`.",
        "",
        "| settings | window (count) | computed | time | Mvoxel/s | GFLOP/s | memory | PSNR vs truth | change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in inf["rows"]:
        marks = [m for m, r in (("best ±0.1", best), ("fastest ≥ −0.1", fast)) if row["name"] == r["name"]]
        mark = f"**{', '.join(marks)}:** " if marks else ""
        lines.append(
            f"| {mark}{row['name']} | {'×'.join(map(str, row['roi']))} ({row['windows']}) | {row['computed_voxels_per_voxel']:.2f}× "
            f"| {row['seconds']:.1f} s | {row['mvoxel_per_s']:.3f} | {row['flop_per_s'] / 1e9:.1f} "
            f"| {row.get('peak_memory_bytes', 0) * mb:.0f} MiB | {row['psnr_vs_truth_db']:.2f} dB | {row['psnr_change_db']:+.3f} dB |"
        )
    rf = results["roofline"]
    lines += [
        f"| Richardson–Lucy, {rl['iterations']} iterations, PSF {'×'.join(map(str, rl['psf']))} (for reference) | | | "
        f"{rl['seconds']:.1f} s | {rl['mvoxel_per_s']:.3f} | | | {rl['psnr_db']:.2f} dB | |",
        "",
    ]
    il = results["interleaved"]
    lines += [
        f"Timed in alternation ({len(il['times_s']['default'])} rounds, each runs every variant once; "
        f"{il['precision']}, planned windows): the default **{il['mvoxel_per_s']['default']:.3f} Mvoxel/s** "
        f"({il['seconds']['default']:.1f} s, windows {'×'.join(map(str, il['roi']['default']))}, "
        f"{il['peak_memory_bytes']['default'] * mb:.0f} MiB); batch norm kept as layers instead of folded into "
        f"the convolutions {il['seconds']['batch_norm_kept']:.1f} s (folding **{il['batch_norm_folding_speedup']:.2f}×**); "
        f"`max_pass_voxels` ×4 {il['seconds']['budget_x4']:.1f} s (**{il['budget_x4_speedup']:.2f}×**, windows "
        f"{'×'.join(map(str, il['roi']['budget_x4']))}, {il['peak_memory_bytes']['budget_x4'] * mb:.0f} MiB). PSNR vs "
        "truth " + " / ".join(f"{v:.2f}" for v in il["psnr_vs_truth_db"].values()) + " dB. Rows above run one "
        "after another and can differ by what ran before them; these are the ratios to read.",
        "",
    ]
    if "skimage_seconds" in rl:
        lines += [
            f"Richardson–Lucy against scikit-image's `richardson_lucy(clip=False)` on the same volume, PSF and "
            f"{rl['iterations']} iterations (same process, median of one run each): **{rl['speedup_vs_skimage']:.2f}× "
            f"faster** ({rl['seconds']:.2f} s vs {rl['skimage_seconds']:.2f} s); PSNR vs truth after the affine fit "
            f"{rl['psnr_db']:.2f} dB vs {rl['skimage_psnr_db']:.2f} dB (the bundle divides by the boundary "
            "sensitivity, scikit-image does not).",
            "",
        ]
    lines += [
        f"Roofline: best bare 3×3×3 conv3d at width {rf['width']} on {rf['side']}³ over batch 1/2/4, layouts and precisions: "
        + ", ".join(
            f"{d} {v['flop_per_s'] / 1e9:.1f} GFLOP/s (batch {v['batch']}, {v['layout']})"
            for d, v in sorted(rf["best_by_dtype"].items())
        )
        + "".join(
            f". The {label} setting reaches {100 * r['flop_per_s'] / roof:.0f} % of the best of these"
            + (
                f" ({100 * r['flop_per_s'] / rf['best_by_dtype'][r['precision']]['flop_per_s']:.0f} % of its own precision's)"
                if r["precision"] in rf["best_by_dtype"]
                else ""
            )
            for label, r in (("best ±0.1", best), ("fastest ≥ −0.1", fast))
        )
        + ". Generator FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` per window × windows. "
        f"Peak RSS of the inference process: {inf['peak_rss_bytes'] * mb:.0f} MiB.",
        "",
        f"At 100 % of that roofline the reference windows ({ref['computed_voxels_per_voxel']:.2f}× computed voxels, "
        f"{ref['generator_flops'] / np.prod(inf['volume']) / 1e6:.2f} MFLOP per output voxel) would run at most "
        f"{roof / (ref['generator_flops'] / np.prod(inf['volume'])) / 1e6:.2f} Mvoxel/s on this device: a throughput "
        "target above that is reachable only with windows that compute fewer voxels, which changes the output"
        + "".join(
            f" (fewer windows of the same size, \"{row['name']}\": {row['psnr_change_db']:+.2f} dB; larger "
            "windows: the auto rows)"
            for row in inf["rows"]
            if "overlap 0 along z" in row["name"]
        )
        + ".",
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
    d = results["dask"]
    lines += [
        "",
        "## Out-of-core inference as a dask graph (`bundle.ooc.deconvolve_dask`, `LocalCluster`)",
        "",
        "Generator `DeblurUNet("
        + ", ".join(f"{k}={v}" for k, v in d["generator"].items())
        + f")` (the default's; the dask path needs a window-free one), chunks {d['chunks']}, "
        "one thread per worker process; peak RSS of the worker processes (`getrusage`).",
        "",
        "| stack | workers | time | peak RSS per worker |",
        "|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {'×'.join(map(str, r['shape']))} | {r['workers']} | {r['seconds']:.1f} s | {r['worker_peak_bytes'] * mb:.0f} MiB |"
        )
    lines += ["", f"2 workers vs 1 on the larger stack: **{d['speedup_2_vs_1']:.2f}×** faster (same run)."]
    lines.append("")
    atomic_write_text(out_dir / "benchmark.md", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, numbers meaningless")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder of benchmark.md / benchmark.json")
    parser.add_argument(
        "--model", default=None, help="trained generator (bundle folder / model.pt) for inference"
    )
    parser.add_argument(
        "--generator",
        choices=sorted(GENERATORS),
        default="default",
        help="the generator measured: the bundle's default (configs/common.json) or the paper's (4 poolings, "
        "InstanceNorm); --model overrides it for the inference case",
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = settings(args.quick, args.generator)

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
    results["train"] = {
        m: run_case(f"train_{m}", args)
        for m in ("blind", "nonblind", "nonblindpaper", "conventional", "blind_reuse", "conventional_reuse")
    }
    results["roofline"] = run_case("roofline", args)
    results["inference"] = run_case("inference", args)
    results["interleaved"] = run_case("interleaved", args)
    results["rl"] = run_case("rl", args)
    results["dask"] = run_case("dask", args)
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

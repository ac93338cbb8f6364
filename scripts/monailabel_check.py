"""Serve a trained bundle with MONAI Label and check that the server returns what the bundle computes.

What it does, end to end:

1. makes (once) a separate virtualenv for MONAI Label (``--venv``, default ``.venv-monailabel``):
   ``torch==2.13.0``, ``monailabel`` and this package. MONAI Label pulls torchvision, which must never
   enter the bundle's own environment: the check also asserts that this interpreter has none;
2. exports the model as a model-zoo bundle (``scripts/export_bundle.py``) from ``--ckpt_dir`` (or uses
   ``--bundle``, a folder or zip); without either, trains a small non-blind model on simulated data
   first (about a minute), so the check needs nothing but this repository;
3. starts ``monailabel start_server --app apps/monailabel --studies <stacks> --conf bundle <bundle>``
   on 127.0.0.1, waits for ``/info/``;
4. posts one stack to ``/infer/deconvolution?output=image`` and compares the returned float TIFF with
   :func:`bundle.inference.deconvolve` on the same stack (same shape, same voxel size, values equal
   to within ``--tolerance`` of the output's range);
5. writes a JSON report (timings, differences) and exits non-zero on any mismatch.

Usage::

    python scripts/monailabel_check.py                       # everything from scratch
    python scripts/monailabel_check.py --ckpt_dir models --stacks my/stacks --report monailabel.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "monailabel"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
STACK_SUFFIXES = (".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".nrrd")


def _run(cmd: Sequence[str], log: Path, **kwargs) -> None:
    """Run ``cmd`` with its output in ``log``; on failure raise with the log's tail."""
    with open(log, "a") as out:
        proc = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")


def ensure_venv(venv: Path, log: Path) -> Path:
    """The MONAI Label virtualenv's python (made and filled on first use)."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "monailabel").exists():
        print(f"installing MONAI Label into {venv} (separate from this environment; a few minutes)")
        _run([sys.executable, "-m", "venv", venv], log)
        # pins: monailabel 0.8.5's pydicom-seg and numpymaxflow break with pydicom 3 and numpy 2, which
        # pip would otherwise pick; torch stays the CPU build this project pins
        _run([python, "-m", "pip", "install", "-q", "torch==2.13.0", "monailabel", "pydicom<3", "numpy<2", "-e", ROOT], log)
    elif subprocess.run([str(python), "-c", "import bundle"], capture_output=True, cwd="/").returncode:
        _run([python, "-m", "pip", "install", "-q", "-e", ROOT], log)  # a MONAI Label venv made elsewhere
    return python


QUICK_CONFIGS = "['configs/common.json','configs/train.json','configs/train_nonblind.json','configs/quick.json']"


def quick_model(work: Path, log: Path) -> Path:
    """A small non-blind model trained on simulated data (the check needs a real checkpoint, not a good one)."""
    data, ckpt = work / "data", work / "models"
    bundle = [sys.executable, "-m", "monai.bundle", "run"]
    _run([*bundle, "simulate", "--config_file", "configs/simulate.json", "--dataset_dir", data,
          "--shape", "[32,64,64]", "--eval_shape", "[32,96,96]", "--n_train", "2", "--n_val", "1",
          "--n_test", "2", "--psf_shape", "[15,15,15]", "--progress", "False"], log, cwd=ROOT)
    _run([*bundle, "training", "--config_file", QUICK_CONFIGS,
          "--dataset_dir", data, "--ckpt_dir", ckpt, "--output_dir", work / "eval",
          "--max_epochs", "2", "--val_interval", "1", "--progress", "False"], log, cwd=ROOT)
    return ckpt


def exported_bundle(args: argparse.Namespace, work: Path, log: Path) -> Path:
    """The bundle folder to serve: ``--bundle`` (folder or zip) or an export of ``--ckpt_dir``."""
    source = Path(args.bundle) if args.bundle else None
    if source is None:
        ckpt = Path(args.ckpt_dir) if args.ckpt_dir else quick_model(work, log)
        configs = args.config_file or (QUICK_CONFIGS if not args.ckpt_dir else "configs/common.json")
        source = work / "served.zip"
        _run([sys.executable, ROOT / "scripts" / "export_bundle.py", "--ckpt_dir", ckpt, "--output", source,
              "--config_file", configs], log, cwd=ROOT)
    if source.is_dir():
        return source
    with zipfile.ZipFile(source) as z:
        z.extractall(work / "bundle")
    tops = [p for p in (work / "bundle").iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 and (tops[0] / "configs").is_dir() else work / "bundle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float) -> float:
    """Seconds until ``url/info/`` answers; raise with the server log if it dies or times out."""
    import requests

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"monailabel exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                return time.perf_counter() - start
        except requests.ConnectionError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"monailabel did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def check(args: argparse.Namespace) -> dict:
    import numpy as np
    import requests

    from bundle.inference import deconvolve
    from bundle.io import load_volume

    if importlib.util.find_spec("torchvision") is not None:
        raise RuntimeError("torchvision is installed in this environment; MONAI Label belongs in its own virtualenv")
    work = Path(tempfile.mkdtemp(prefix="monailabel_check_"))
    log = work / "log.txt"
    report: dict = {"work_dir": str(work)}
    t0 = time.perf_counter()
    python = ensure_venv(Path(args.venv), log)
    report["venv"] = {"path": str(args.venv), "seconds": round(time.perf_counter() - t0, 1)}
    report["venv"]["versions"] = subprocess.run(
        # metadata only: importing torchvision there fails (its PyPI build expects CUDA torch), and the
        # infer path never imports it
        [str(python), "-c", "from importlib.metadata import version as v; "
         "print(*(f'{p}=={v(p)}' for p in ('monailabel', 'torch', 'torchvision', 'monai', 'numpy')))"],
        capture_output=True, text=True, check=True).stdout.split()
    bundle_dir = exported_bundle(args, work, log)
    stacks = Path(args.stacks) if args.stacks else work / "data" / "test" / "blurred"
    files = sorted(p for p in stacks.iterdir() if p.name.lower().endswith(STACK_SUFFIXES)) if stacks.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{stacks}: no stacks ({', '.join(STACK_SUFFIXES)})")
    stack = files[0]

    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = work / "server.txt"
    cmd = [str(python.parent / "monailabel"), "start_server", "--app", str(APP), "--studies", str(stacks),
           "--conf", "bundle", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port)]
    # as if the venv were activated: the monailabel launcher runs the first ``python`` on PATH
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(python.parent.parent)}
    env.pop("PYTHONPATH", None)
    with open(server_log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env)
    try:
        report["server_start_s"] = round(wait_for_server(url, server, server_log, args.timeout), 1)
        info = requests.get(f"{url}/info/", timeout=30).json()
        report["models"] = {k: v.get("type") for k, v in info.get("models", {}).items()}
        start = time.perf_counter()
        with open(stack, "rb") as f:
            response = requests.post(f"{url}/infer/deconvolution", params={"output": "image"},
                                     files={"file": (stack.name, f)}, timeout=args.timeout)
        report["infer_request_s"] = round(time.perf_counter() - start, 2)
        if not response.ok:
            raise RuntimeError(f"infer request failed ({response.status_code}): {response.text[:2000]}")
        returned = work / "returned.tif"
        returned.write_bytes(response.content)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    served, served_meta = load_volume(returned, dtype=np.float32)
    source, source_meta = load_volume(stack, dtype=np.float32)
    start = time.perf_counter()
    expected = deconvolve(source, model=bundle_dir, axes="ZYX", progress=False, device="cpu")
    report["deconvolve_s"] = round(time.perf_counter() - start, 2)
    same_shape = served.shape == expected.shape
    value_range = float(expected.max() - expected.min()) or 1.0
    max_diff = float(np.abs(served - expected).max()) if same_shape else float("inf")
    voxel_ok = served_meta["voxel_size"] == source_meta["voxel_size"] or np.allclose(
        served_meta["voxel_size"] or [np.nan], source_meta["voxel_size"] or [np.nan], rtol=1e-5)
    report.update({
        "stack": str(stack),
        "shape": {"input": list(source.shape), "served": list(served.shape), "deconvolve": list(expected.shape)},
        "voxel_size_um": {"input": source_meta["voxel_size"], "served": served_meta["voxel_size"]},
        "served_dtype": str(served.dtype),
        "max_abs_difference": max_diff,
        "max_abs_difference_relative_to_range": max_diff / value_range,
        "tolerance": args.tolerance,
    })
    report["passed"] = bool(same_shape and voxel_ok and max_diff / value_range <= args.tolerance)
    if not args.keep:
        shutil.rmtree(work / "data", ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-monailabel"), help="MONAI Label virtualenv (made if missing)")
    parser.add_argument("--bundle", default=None, help="exported bundle folder or zip to serve")
    parser.add_argument("--ckpt_dir", default=None, help="trained weights to export and serve")
    parser.add_argument("--config_file", default=None,
                        help="the training's config list, for the export (default: configs/common.json)")
    parser.add_argument("--stacks", default=None, help="folder of stacks (the server's studies); the first is posted")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server / a request")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max |served - deconvolve| / output range")
    parser.add_argument("--report", default=None, help="write the JSON report here too")
    parser.add_argument("--keep", action="store_true", help="keep the simulated data in the work folder")
    args = parser.parse_args(argv)
    report = check(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print("MONAI Label check " + ("passed" if report["passed"] else "FAILED"))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

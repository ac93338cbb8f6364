"""Feed bad inputs to the inference command line; print one markdown table row per case.

    python scripts/try_bad_inputs.py > bad_inputs.md

Each case runs ``python -m monai.bundle run inference`` on a made-up input (a throw-away random
model), and reports the last line the user sees, the exit status and what was written. The table
in ``docs/reliability.md`` was made with it; ``tests/test_errors.py`` asserts a subset.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bundle.io import save_volume  # noqa: E402
from bundle.networks import DeblurUNet  # noqa: E402

T = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
rng = np.random.default_rng(0)
good = rng.random((16, 32, 32), dtype=np.float32)
net = DeblurUNet(
    features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False, voxel_size=(0.1, 0.1, 0.1)
)
with torch.no_grad():
    for p in net.parameters():
        p.normal_(0, 0.3)
torch.save(net.eval().state_dict(), T / "model.pt")
print("| input | last line printed | exit | written |\n|---|---|---|---|")


def case(name, make, extra=()):
    d = T / name.replace(" ", "_")
    d.mkdir()
    inp = make(d)
    out = d / "out"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        "['configs/common.json','configs/inference.json']",
        "--input",
        str(inp),
        "--output_dir",
        str(out),
        "--ckpt_path",
        str(T / "model.pt"),
        "--progress",
        "false",
        *extra,
    ]
    res = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    last = (res.stderr.strip().splitlines() or [""])[-1].replace(str(d) + "/", "").replace(str(T) + "/", "")
    written = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    print(f"| {name} | `{last[:220]}` | {res.returncode} | {', '.join(written) or 'nothing'} |", flush=True)


def f(name, arr, **kw):
    def make(d):
        p = d / name
        if isinstance(arr, bytes):
            p.write_bytes(arr)
        elif kw.get("raw"):
            tifffile.imwrite(p, arr, **{k: v for k, v in kw.items() if k != "raw"})
        else:
            save_volume(p, arr, voxel_size=(0.1, 0.1, 0.1))
        return p

    return make


nan = good.copy()
nan[3, 4, 5] = np.nan
case("missing file", lambda d: d / "none.tif")
case("empty folder", lambda d: d)
case("0-byte TIFF", f("a.tif", b""))
case(
    "truncated TIFF",
    lambda d: (
        save_volume(d / "t.tif", good),
        (d / "t.tif").write_bytes((d / "t.tif").read_bytes()[:3000]),
        d / "t.tif",
    )[-1],
)
case("text file named .tif", f("a.tif", b"hello, not an image"))
case("unknown extension", f("a.xyz", b"data"))
case("2D image", f("a.tif", good[0], raw=True))
case(
    "2D RGB TIFF",
    f("a.tif", (good[0, :, :, None] * np.ones(3) * 255).astype(np.uint8), raw=True, photometric="rgb"),
)
case(
    "multichannel stack without --channel",
    f("a.tif", np.stack([good, good], 1), raw=True, imagej=True, metadata={"axes": "ZCYX"}),
)
case("time series", f("a.tif", np.stack([good, good]), raw=True, imagej=True, metadata={"axes": "TZYX"}))
case("NaN voxel", f("a.tif", nan, raw=True))
case("constant volume", f("a.tif", np.ones((16, 32, 32), np.float32), raw=True))
case(
    "bad file among good ones",
    lambda d: (save_volume(d / "a.tif", good), tifffile.imwrite(d / "z.tif", nan), d)[-1],
)
case("output extension .xyz", lambda d: save_volume(d / "a.tif", good), ["--output_ext", ".xyz"])
case("output folder is a file", lambda d: ((d / "out").write_text(""), save_volume(d / "a.tif", good))[-1])
case(
    "voxel size 0.2 µm z for a 0.1 µm model (warning, runs)",
    lambda d: save_volume(d / "a.tif", good + 0.5, voxel_size=(0.2, 0.1, 0.1)),
)
shutil.rmtree(T, ignore_errors=True)

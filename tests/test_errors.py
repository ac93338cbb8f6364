"""bundle.errors: a failed command-line run ends with the real message (file and problem), exit status 1."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from bundle_cli import run_module

from bundle.errors import _hook, root_cause
from bundle.io import save_volume

from conftest import ROOT, SUBPROCESS_TIMEOUT


def test_root_cause_skips_only_the_config_wrappers():
    os_error = NotADirectoryError("Not a directory: 'afile/o'")
    ours = FileNotFoundError("a.tif: no such file")
    ours.__cause__ = os_error  # the bundle's message, raised from the OS error
    component = RuntimeError("Failed to instantiate component 'bundle.x' with keywords: a")
    component.__cause__ = ours
    outer = RuntimeError("Failed to evaluate ConfigExpression['$@x']")
    outer.__cause__ = component
    assert root_cause(outer) is ours and root_cause(ours) is ours
    plain = RuntimeError("size mismatch")
    assert root_cause(plain) is plain


def test_hook_prints_the_cause_last(capsys):
    printed: list[str] = []
    hook = _hook(lambda *args: printed.append("traceback"))
    try:
        try:
            raise ValueError("b.tif: contains NaN")
        except ValueError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as outer:
        hook(type(outer), outer, outer.__traceback__)
    assert printed == ["traceback"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == "Error: ValueError: b.tif: contains NaN"


def _last_line(*overrides: str) -> tuple[int, str]:
    args = ["run", "inference", "--config_file", "['configs/common.json','configs/inference.json']", "--progress", "false",
            *overrides]  # fmt: skip
    res = run_module("monai.bundle", args, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    return res.returncode, res.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_cli_errors_end_with_the_file_and_the_problem_and_write_nothing(tmp_path):
    volume = np.random.default_rng(0).random((8, 16, 16), dtype=np.float32)
    save_volume(tmp_path / "in" / "a.tif", volume)
    bad = volume.copy()
    bad[2, 3, 4] = np.nan
    (tmp_path / "bad").mkdir()
    tifffile.imwrite(tmp_path / "bad" / "n.tif", bad)  # save_volume refuses NaN
    (tmp_path / "afile").write_text("")
    cases = {
        "missing input": (["--input", str(tmp_path / "nothing")], [str(tmp_path / "nothing"), "no such file"]),
        "NaN voxel": (["--input", str(tmp_path / "bad")], ["n.tif", "NaN"]),
        "bad extension": (["--input", str(tmp_path / "in"), "--output_ext", ".xyz"], [".xyz", "output_ext"]),
        "output is a file": (["--input", str(tmp_path / "in"), "--output_dir", str(tmp_path / "afile")], ["afile", "is a file"]),
        "under a file": (["--input", str(tmp_path / "in"), "--output_dir", str(tmp_path / "afile" / "o")], ["afile", "is a file"]),
    }  # fmt: skip
    for name, (overrides, words) in cases.items():
        out = tmp_path / "out"
        extra = [] if "--output_dir" in overrides else ["--output_dir", str(out)]
        code, last = _last_line(*overrides, *extra, "--ckpt_path", str(tmp_path / "none.pt"))
        assert code != 0, name
        assert last.startswith("Error:") and all(w in last for w in words), (name, last)
        assert not out.exists() or not any(out.iterdir()), name

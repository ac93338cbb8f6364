"""The README demo's summary: it prints the best validation scores and the test report from any folder."""

from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def _demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(folder):
    (folder / "test").mkdir(parents=True)
    history = [
        {"epoch": 2, "iteration": 50, "val_psnr": 24.0, "val_ssim": 0.5, "val_input_psnr": 22.5, "val_input_ssim": 0.29},
        {"epoch": 4, "iteration": 100, "val_psnr": 26.5, "val_ssim": 0.8, "val_input_psnr": 22.5, "val_input_ssim": 0.29,
         "psf": {"gain": 10.56721}},
    ]
    (folder / "validation.json").write_text(json.dumps(history))
    (folder / "test" / "report.md").write_text("| volume | PSNR |\n|---|---|\n| test_000 | 30.82 |\n")


def test_summary_of_an_output_folder_outside_the_repository(tmp_path, capsys):
    """An absolute ``--output_dir`` elsewhere (the demo failed there after training, on a relative path)."""
    _write_run(tmp_path / "eval")
    _demo().print_summary(tmp_path / "eval")
    out = capsys.readouterr().out
    assert "best epoch 4, iteration 100" in out and "26.50" in out and "{'gain': 10.5672}" in out
    assert f"=== test set: {tmp_path / 'eval' / 'test' / 'report.md'} ===" in out and "| test_000 | 30.82 |" in out


def test_summary_inside_the_repository_shows_a_relative_path(tmp_path, capsys):
    folder = ROOT / "eval" / f"_summary_test_{tmp_path.name}"
    try:
        _write_run(folder)
        _demo().print_summary(folder)
        assert f"=== test set: eval/_summary_test_{tmp_path.name}/test/report.md ===" in capsys.readouterr().out
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)

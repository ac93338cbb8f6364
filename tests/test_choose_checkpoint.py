"""scripts/choose_checkpoint.py: every kept checkpoint scored by the sharp cycle (and the ground truth)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import QUICK_NONBLIND, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from choose_checkpoint import choices, main  # noqa: E402


def test_choices_pick_by_score_and_report_the_spread():
    rows = [
        {"iteration": 25, "sharp_cycle": 20.0, "val_psnr": 24.0},
        {"iteration": 50, "sharp_cycle": 23.0, "val_psnr": 27.0},
        {"iteration": 75, "sharp_cycle": 22.0, "val_psnr": 25.5},
    ]
    out = choices(rows)
    assert out["sharp_cycle_choice"]["iteration"] == 50 and out["ground_truth_choice"]["iteration"] == 50
    assert out["last"]["iteration"] == 75 and out["spread_db"] == pytest.approx(3.0)
    assert out["correlation"] > 0.9
    assert "ground_truth_choice" not in choices([{"iteration": 1, "sharp_cycle": 1.0}])  # no truth, no such choice


@pytest.mark.slow
def test_scores_the_kept_checkpoints_of_a_run(quick_model, tmp_path):
    out = tmp_path / "choice.json"
    result = main([
        "--config_file", QUICK_NONBLIND, "--ckpt_dir", str(quick_model["ckpt_dir"]),
        "--set", f"dataset_dir={json.dumps(str(quick_model['dataset_dir']))}", "--max_volumes", "2",
        "--output", str(out),
    ])  # fmt: skip
    kept = sorted(int(p.stem.split("_")[1]) for p in (Path(quick_model["ckpt_dir"]) / "checkpoints").glob("checkpoint_*.pt"))
    assert [r["iteration"] for r in result["rows"]] == kept and len(kept) >= 2
    history = {e["iteration"]: e for e in json.loads((Path(quick_model["output_dir"]) / "validation.json").read_text())}
    for row in result["rows"]:
        assert 15.0 < row["sharp_cycle"] < 60.0 and row["val_psnr"] > 15.0
        if row["iteration"] in history:  # the training's own validation of the same weights and pairs
            assert row["val_psnr"] == pytest.approx(history[row["iteration"]]["val_psnr"], abs=0.05)
    assert json.loads(out.read_text())["last"]["iteration"] == kept[-1]
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["--config_file", QUICK_NONBLIND, "--ckpt_dir", str(tmp_path)])

"""bundle.data.camera and scripts/correct_hot_pixels.py: a camera's hot pixels found and replaced."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.data import MetaTensor

from bundle.data import paired_transforms, unpaired_dataset
from bundle.data.camera import CorrectHotPixelsd, correct_hot_pixels, find_hot_pixels, warn_hot_pixels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import correct_hot_pixels as chp  # noqa: E402


def _blurred(tiny_dataset) -> list[Path]:
    return sorted(tiny_dataset.rglob("blurred/*.tif"))


def _with_hot_pixels(clean: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``clean`` plus ``count`` hot columns (offsets 0.1-1 x its maximum, the same in every plane), and their mask."""
    rng = np.random.default_rng(seed)
    _, y, x = clean.shape
    mask = np.zeros((y, x), dtype=bool)
    mask.flat[rng.choice(y * x, size=count, replace=False)] = True
    offsets = np.zeros((y, x))
    offsets[mask] = rng.uniform(0.1, 1.0, size=count) * clean.max()
    return clean + offsets[None], mask


def test_no_hot_pixels_found_in_simulated_stacks(tiny_dataset):
    files = _blurred(tiny_dataset)
    assert len(files) == 4
    masks = [find_hot_pixels(tifffile.imread(f)) for f in files]
    assert sum(int(m.sum()) for m in masks) == 0


def test_hot_pixels_found_exactly_and_replaced(tiny_dataset):
    for i, f in enumerate(_blurred(tiny_dataset)):
        clean = tifffile.imread(f).astype(np.float64)
        stack, truth = _with_hot_pixels(clean, 30, seed=i)
        fixed, mask = correct_hot_pixels(stack)
        assert (mask == truth).all()
        assert (fixed[:, ~mask] == stack[:, ~mask]).all()  # nothing else touched
        excess_before = np.abs(stack[:, mask] - clean[:, mask]).mean()
        excess_after = np.abs(fixed[:, mask] - clean[:, mask]).mean()
        assert excess_after < 0.1 * excess_before
        assert fixed.dtype == np.float64 and np.shares_memory(fixed, stack) is False


def test_structure_in_a_few_planes_is_not_a_hot_pixel():
    rng = np.random.default_rng(0)
    stack = 0.1 + 0.01 * rng.standard_normal((16, 32, 32))
    stack[6:9, 10, 10] += 1.0  # a bright one-voxel-wide object in three planes
    stack[:, 20, 20] += 1.0  # a hot pixel: every plane
    mask = find_hot_pixels(stack)
    assert mask[20, 20] and not mask[10, 10] and mask.sum() == 1


def test_structure_along_z_through_every_plane_is_not_a_hot_pixel():
    """Vertical sheets and tubes, blurred by the optics, stand out in every plane too: their halo tells them apart."""
    from bundle.physics.born_wolf import born_wolf_psf
    from bundle.physics.forward import simulate_acquisition

    sample = np.zeros((24, 64, 64), dtype=np.float32)
    sample[:, :, 12] = 1.0  # a sheet normal to the coverslip (a cell's side membrane)
    sample[:, 10:50, 40] = 0.6
    for y, x in [(20, 25), (45, 28), (52, 52)]:
        sample[:, y, x] = 0.8  # filaments along Z
    stack, _ = simulate_acquisition(sample, born_wolf_psf((21, 21, 21)), 20.0, seed=0)
    assert find_hot_pixels(stack, max_halo=None).sum() > 20  # without the halo test structure counts as hot
    assert find_hot_pixels(stack).sum() == 0
    hot, truth = _with_hot_pixels(stack.astype(np.float64), 10, seed=3)
    assert (find_hot_pixels(hot) == truth).all()  # defects beside that structure are still found
    with pytest.raises(ValueError, match="max_halo"):
        find_hot_pixels(stack, max_halo=0.0)


def test_the_rings_of_bright_vertical_tubes_are_not_hot_pixels():
    """At 40 dB the rings of the axially integrated PSF around vertical tubes pass the halo test
    (53 pixels of twelve tubes, session 39); the line test leaves few of them (10)."""
    from bundle.physics.born_wolf import born_wolf_psf
    from bundle.physics.forward import simulate_acquisition

    sample = np.zeros((32, 96, 96), dtype=np.float32)
    rng = np.random.default_rng(0)
    for _ in range(12):
        y, x = rng.integers(8, 88, 2)
        sample[:, y, x] = rng.uniform(0.3, 1.0)
    stack, _ = simulate_acquisition(sample, born_wolf_psf((31, 31, 31)), 40.0, seed=1)
    assert find_hot_pixels(stack, max_halo=None).sum() > 200
    assert find_hot_pixels(stack).sum() <= 12


def test_line_test_on_hand_made_neighbourhoods():
    """Two neighbours at least 90° apart as bright as the pixel: a line or ring, not a hot pixel; one
    bright neighbour (a hot neighbour) or two side by side (the flank of structure) are allowed."""
    from bundle.data.camera import _on_a_line

    def centre(bright: list[tuple[int, int]], value: float = 2.0) -> bool:
        image = np.zeros((5, 5))
        image[2, 2] = 1.0
        for dy, dx in bright:
            image[2 + dy, 2 + dx] = value
        return bool(_on_a_line(image, np.array([2]), np.array([2]))[0])

    assert not centre([])
    assert not centre([(0, 1)])  # a hot neighbour
    assert not centre([(-1, -1), (-1, 0)])  # the flank of structure, 45° apart
    assert centre([(0, -1), (0, 1)])  # a line through it
    assert centre([(-1, 0), (0, 1)])  # a bend of a ring, 90° apart
    assert centre([(-1, -1), (1, 0)])  # 135° apart
    assert not centre([(0, -1), (0, 1)], value=0.9)  # neighbours dimmer than it
    corner = np.zeros((4, 4))
    corner[0, 0] = 1.0  # clipped at the border the pixel is not its own neighbour
    assert not _on_a_line(corner, np.array([0]), np.array([0]))[0]


def test_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="expects a \\(Z, Y, X\\) stack"):
        find_hot_pixels(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="quantile"):
        find_hot_pixels(np.zeros((4, 8, 8)), quantile=0.9)
    two_planes = np.zeros((2, 8, 8))
    two_planes[:, 3, 3] = 1.0
    assert not find_hot_pixels(two_planes).any()  # too few planes to tell: nothing found
    flat = np.zeros((5, 8, 8))
    flat[:, 2, 5] = 1.0  # noise-free: the excess in every plane still counts
    assert find_hot_pixels(flat).sum() == 1


def test_dictionary_transform_keeps_metadata_and_stores_the_mask():
    rng = np.random.default_rng(1)
    clean = 0.2 + 0.003 * rng.standard_normal((12, 24, 24))  # the weakest offset, 0.1 x max, is ~8 sigma
    stack, truth = _with_hot_pixels(clean, 5, seed=2)
    image = MetaTensor(torch.as_tensor(stack[None], dtype=torch.float32), meta={"filename_or_obj": "a.tif"})
    out = CorrectHotPixelsd(keys="image", mask_key_postfix="_hot")({"image": image, "other": 1})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "a.tif"
    assert out["image"].shape == (1, 12, 24, 24) and out["image"].dtype == torch.float32
    assert (out["image_hot"] == truth).all() and out["other"] == 1
    assert float(out["image"][0][:, truth].mean()) < 0.205 < 0.22 < float(image[0][:, truth].mean())
    with pytest.raises(ValueError, match="2 channels"):
        CorrectHotPixelsd(keys="image")({"image": np.zeros((2, 4, 8, 8))})


def test_script_writes_corrected_copies_and_never_an_input(tiny_dataset, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    truths = {}
    for i, f in enumerate(_blurred(tiny_dataset)[:2]):
        stack, truths[f"v{i}.tif"] = _with_hot_pixels(tifffile.imread(f).astype(np.float32), 12, seed=10 + i)
        tifffile.imwrite(src / f"v{i}.tif", stack.astype(np.float32))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    assert chp.main(["--input", str(src), "--output", str(out)]) == 0
    assert "24 hot pixels" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    summary = json.loads((out / "hot_pixels.json").read_text())
    for name, truth in truths.items():
        assert summary["files"][name]["hot_pixels"] == 12
        assert sorted(map(tuple, summary["files"][name]["yx"])) == sorted(zip(*np.nonzero(truth)))
        fixed = tifffile.imread(out / name)
        assert fixed.shape == tifffile.imread(src / name).shape and fixed.dtype == np.float32
    # an existing output is never replaced; a missing input is a clear error
    assert chp.main(["--input", str(src), "--output", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert chp.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o2")]) == 1
    assert "nothing: no such file or folder" in capsys.readouterr().err


# ---- the correction inside the pipelines (the ``hot_pixel_threshold`` config key) ----


def _hot_folder(tiny_dataset, folder: Path, split: str = "train") -> list[tuple[Path, np.ndarray]]:
    """The tiny dataset's ``split`` blurred stacks with 30 hot pixels each, written to ``folder``;
    returns ``(path, clean stack)`` pairs."""
    folder.mkdir(parents=True)
    written = []
    for i, f in enumerate(sorted((tiny_dataset / split / "blurred").glob("*.tif"))):
        clean = tifffile.imread(f).astype(np.float32)
        stack, _ = _with_hot_pixels(clean, 30, seed=10 + i)
        tifffile.imwrite(folder / f.name, stack.astype(np.float32))
        written.append((folder / f.name, clean))
    return written


def test_threshold_none_passes_the_stack_unchanged():
    stack = torch.rand(1, 4, 8, 8)
    stack[0, :, 3, 3] += 5.0
    out = CorrectHotPixelsd("image", threshold=None, mask_key_postfix="_hot")({"image": stack})
    assert out["image"] is stack and "image_hot" not in out
    assert CorrectHotPixelsd("image")({"image": stack})["image"][0, :, 3, 3].max() < 2.0
    for off in (0, "0", "null", "None", "off"):  # a command line's spellings of "no correction"
        assert CorrectHotPixelsd("image", threshold=off).threshold is None
    assert CorrectHotPixelsd("image", threshold="3.5").threshold == 3.5
    for bad in ("four", -1.0, True):
        with pytest.raises(ValueError, match="hot_pixel_threshold must be a number > 0, or 0 / None / 'off'"):
            CorrectHotPixelsd("image", threshold=bad)
    fixed, mask = correct_hot_pixels(stack[0].numpy(), 0)
    assert not mask.any() and np.array_equal(fixed, stack[0].numpy())


def test_the_command_line_switches_the_correction_off_with_0(tiny_dataset):
    """MONAI's `run` drops an override whose value is None, so `--hot_pixel_threshold None` leaves the
    default (4) on; 0 switches the correction off in training (datasets and the model's record) and
    in inference alike."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    assert update_kwargs({"hot_pixel_threshold": 4.0}, hot_pixel_threshold=None) == {"hot_pixel_threshold": 4.0}
    overrides = update_kwargs({}, hot_pixel_threshold=0)  # what `--hot_pixel_threshold 0` becomes
    train = ConfigParser()
    train.read_config([str(ROOT / "configs" / f) for f in ("common.json", "train.json")])
    train.update(overrides)
    train["dataset_dir"] = str(tiny_dataset)
    assert train.get_parsed_content("validate#handlers#1#preprocessing") == {"hot_pixel_threshold": None}
    correct = train.get_parsed_content("validate#preprocessing").transforms[1]
    assert isinstance(correct, CorrectHotPixelsd) and correct.threshold is None
    inference = ConfigParser()
    inference.read_config([str(ROOT / "configs" / f) for f in ("common.json", "inference.json")])
    inference.update(overrides)
    inference["dataset_dir"] = str(tiny_dataset)
    correct = inference.get_parsed_content("preprocessing").transforms[1]
    assert isinstance(correct, CorrectHotPixelsd) and correct.threshold is None


def test_warning_names_the_stacks_with_hot_pixels(tiny_dataset, caplog):
    clean = tifffile.imread(_blurred(tiny_dataset)[0]).astype(np.float32)
    hot, _ = _with_hot_pixels(clean, 30, seed=0)
    with caplog.at_level("WARNING", logger="bundle.data.camera"):
        assert warn_hot_pixels([("clean.tif", clean), ("hot.tif", torch.from_numpy(hot)[None])]) == 1
    assert "hot.tif (30)" in caplog.text and "clean.tif" not in caplog.text and "hot_pixel_threshold" in caplog.text
    caplog.clear()
    assert warn_hot_pixels([("clean.tif", clean)]) == 0 and not caplog.text


def test_validation_pipeline_corrects_before_the_normalisation(tiny_dataset, tmp_path):
    """With 30 hot pixels the 99.9th percentile lands on them and dims the whole stack; corrected as it
    is read, the stack normalises as the clean one does."""
    (path, clean), *_ = _hot_folder(tiny_dataset, tmp_path / "hot")
    clean_path = tmp_path / "clean.tif"
    tifffile.imwrite(clean_path, clean)
    reference = paired_transforms(with_label=False)({"image": str(clean_path)})["image"]
    raw = paired_transforms(with_label=False)({"image": str(path)})["image"]
    fixed = paired_transforms(with_label=False, image_hot_pixel_threshold=4.0)({"image": str(path)})["image"]
    error_raw, error_fixed = float((raw - reference).abs().mean()), float((fixed - reference).abs().mean())
    assert error_fixed < 0.1 * error_raw, (error_fixed, error_raw)


def test_unpaired_dataset_corrects_or_warns(tiny_dataset, tmp_path, caplog):
    written = _hot_folder(tiny_dataset, tmp_path / "blurred")
    sharp = str(tiny_dataset / "train" / "sharp")
    kwargs = {"sharp_dir": sharp, "blurred_dir": str(tmp_path / "blurred"), "length": 2, "patch_size": (16, 32, 32)}
    with caplog.at_level("WARNING", logger="bundle.data.camera"):
        raw = unpaired_dataset(**kwargs)
    assert all(f"{p} (30)" in caplog.text for p, _ in written)
    assert int(find_hot_pixels(raw.blurred.volumes[0]["image"][0].numpy()).sum()) == 30
    caplog.clear()
    with caplog.at_level("INFO", logger="bundle.data.camera"):
        fixed = unpaired_dataset(**kwargs, blurred_hot_pixel_threshold=4.0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    replaced = [r.getMessage() for r in caplog.records if "hot pixels replaced" in r.getMessage()]
    assert sorted(replaced) == sorted(f"{p}: 30 hot pixels replaced (threshold 4)" for p, _ in written)
    assert all(int(find_hot_pixels(v["image"][0].numpy()).sum()) == 0 for v in fixed.blurred.volumes)


def test_inference_config_corrects_when_the_key_is_set(tiny_dataset, tmp_path):
    """``configs/inference.json`` reads the key; ``inference_rl.json``'s clip override still reaches the
    normalisation (the correction shifted it one place down the list)."""
    from monai.bundle import ConfigParser

    from bundle.inference import NormalizePercentilesd

    (path, clean), *_ = _hot_folder(tiny_dataset, tmp_path / "hot")
    for extra, threshold in (([], 4.0), (["inference_rl.json"], None)):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / f) for f in ["common.json", "inference.json", *extra]])
        parser["dataset_dir"], parser["hot_pixel_threshold"] = str(tiny_dataset), threshold
        transforms = parser.get_parsed_content("preprocessing").transforms
        assert isinstance(transforms[1], CorrectHotPixelsd) and transforms[1].threshold == threshold
        assert isinstance(transforms[3], NormalizePercentilesd) and transforms[3].clip is (not extra)
    image = transforms[0]({"image": str(path)})
    fixed = CorrectHotPixelsd("image", threshold=4.0)(image)["image"]
    assert float((fixed[0] - torch.from_numpy(clean)).abs().max()) < float(np.abs(tifffile.imread(path) - clean).max()) / 5


def test_python_api_and_report_correct_when_asked(tiny_dataset, tmp_path):
    from bundle.evaluate import DeconvolutionReport
    from bundle.inference import deconvolve
    from bundle.networks import DeblurUNet

    written = _hot_folder(tiny_dataset, tmp_path / "hot", split="test")
    path, _ = written[0]
    net = DeblurUNet(features=(4, 8, 16, 4), depth=2).eval()
    options = {"model": net, "progress": False, "refine_iterations": 0, "flips": 1, "device": "cpu"}
    hot = tifffile.imread(path)
    corrected, mask = correct_hot_pixels(hot)
    assert mask.sum() == 30
    expected = deconvolve(corrected, **options)
    np.testing.assert_allclose(deconvolve(hot, **options, hot_pixel_threshold=4.0), expected, atol=1e-5)
    assert np.abs(deconvolve(hot, **options) - expected).max() > 1e-3

    report = DeconvolutionReport(net, None, str(tmp_path / "hot"), str(tiny_dataset / "test" / "ground_truth"),
                                 str(tmp_path / "out"), hot_pixel_threshold=4.0)  # fmt: skip
    image = report._load_pairs(None)[0]["image_norm"][0].numpy()
    assert int(find_hot_pixels(image).sum()) == 0


def test_the_training_records_the_threshold_and_inference_reads_it(tiny_dataset, tmp_path):
    """BestModelSaver writes train.json's key into model.json; inference.json, deconvolve() and
    trained_hot_pixel_threshold read it back ("auto"); a value given overrides it."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    from bundle.data import trained_hot_pixel_threshold
    from bundle.handlers import BestModelSaver
    from bundle.inference import deconvolve
    from bundle.networks import DeblurUNet

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("common.json", "train.json")])
    parser["hot_pixel_threshold"] = 4.0
    assert parser["validate#handlers#1#_target_"] == "bundle.handlers.BestModelSaver"
    preprocessing = parser.get_parsed_content("validate#handlers#1#preprocessing")
    assert preprocessing == {"hot_pixel_threshold": 4.0}

    torch.manual_seed(0)
    net = DeblurUNet(features=(4, 8, 16, 4), depth=2).eval()
    folder = tmp_path / "models"
    validator = Engine(lambda e, b: None)
    validator.state.metrics, validator.state.key_metric_name = {"val_psnr": 30.0}, "val_psnr"
    BestModelSaver(str(folder), net, preprocessing=preprocessing)(validator)
    assert json.loads((folder / "model.json").read_text())["preprocessing"] == {"hot_pixel_threshold": 4.0}
    assert trained_hot_pixel_threshold(folder) == 4.0
    assert trained_hot_pixel_threshold(None) is None and trained_hot_pixel_threshold(tmp_path / "nothing") is None
    assert trained_hot_pixel_threshold(folder / "model.pt") == 4.0  # a model file: the record beside it
    import shutil
    import zipfile

    shutil.copytree(folder, tmp_path / "bundle" / "models")  # a bundle folder, and its zip (export_bundle.py)
    assert trained_hot_pixel_threshold(tmp_path / "bundle") == 4.0
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as zf:
        zf.write(folder / "model.json", "bundle/models/model.json")
    assert trained_hot_pixel_threshold(tmp_path / "bundle.zip") == 4.0

    for ckpt_dir, expected in ((folder, 4.0), (tmp_path / "nothing", None)):
        inference = ConfigParser()
        inference.read_config([str(ROOT / "configs" / f) for f in ("common.json", "inference.json")])
        inference["dataset_dir"], inference["ckpt_dir"] = str(tiny_dataset), str(ckpt_dir)
        assert inference.get_parsed_content("preprocessing").transforms[1].threshold == expected

    (path, _), *_ = _hot_folder(tiny_dataset, tmp_path / "hot", split="test")
    hot = tifffile.imread(path)
    options = {"progress": False, "refine_iterations": 0, "flips": 1, "device": "cpu"}
    auto = deconvolve(hot, folder, **options)
    np.testing.assert_allclose(auto, deconvolve(correct_hot_pixels(hot)[0], folder, **options, hot_pixel_threshold=None), atol=1e-5)
    assert np.abs(deconvolve(hot, folder, **options, hot_pixel_threshold=None) - auto).max() > 1e-3

    (folder / "model.json").write_text(json.dumps({"score": 1, "preprocessing": {"hot_pixel_threshold": "four"}}))
    with pytest.raises(ValueError, match="model.json: preprocessing.hot_pixel_threshold must be a number"):
        trained_hot_pixel_threshold(folder)
    (folder / "model.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="models: not a readable model record"):
        trained_hot_pixel_threshold(folder)

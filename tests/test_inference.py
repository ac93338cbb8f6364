"""Inference: the Deconvolver on any shape, normalisation as in training, CLI == Python, bad inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from bundle_cli import run_module
from monai.bundle import ConfigWorkflow
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose

from bundle.data import normalize_transforms
from bundle.inference import (
    DeconvolutionCancelled,
    Deconvolver,
    InferenceNetwork,
    LoadVolumed,
    NormalizePercentilesd,
    checkpoint_folder,
    deconvolve,
    inference_datalist,
    load_checkpoint,
    load_network,
    model_refinement,
    output_path,
    plan_roi_size,
    resolve_precision,
    window_count,
)
from bundle.io import VolumeError, load_volume, save_volume
from bundle.metrics import affine_fit, psnr
from bundle.networks import DeblurUNet

from conftest import ROOT, SUBPROCESS_TIMEOUT, run_bundle

SMALL = (4, 4, 8, 8, 16, 4)
QUICK = "['configs/common.json','configs/quick.json','configs/inference.json']"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    net = DeblurUNet(features=SMALL).eval()
    path = tmp_path_factory.mktemp("small_model") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


def _volume(shape, seed=0, scale=100.0):
    return (np.random.default_rng(seed).random(shape) * scale).astype(np.float32)


def test_normalization_matches_training(tmp_path):
    path = save_volume(tmp_path / "v.tif", _volume((8, 20, 24)), voxel_size=(0.2, 0.1, 0.1))
    train = Compose(normalize_transforms(("image",), (0.1, 99.9)))({"image": str(path)})["image"]
    ours = Compose([LoadVolumed("image"), NormalizePercentilesd("image", (0.1, 99.9))])({"image": str(path)})
    assert torch.equal(torch.as_tensor(train), torch.as_tensor(ours["image"]).float())
    lo, hi = ours["image_range"].tolist()
    vol = load_volume(path)[0]
    assert lo == pytest.approx(np.percentile(vol, 0.1), rel=1e-5) and hi == pytest.approx(np.percentile(vol, 99.9), rel=1e-5)
    assert ours["image"].meta["voxel_size"].tolist() == pytest.approx([0.2, 0.1, 0.1])


@pytest.mark.parametrize("shape", [(1, 1, 5, 7, 9), (2, 1, 20, 40, 50), (1, 1, 33, 32, 70)])
def test_deconvolver_any_shape(shape):
    net = DeblurUNet(features=SMALL).eval()
    deconv = Deconvolver(net, roi_size=(32, 32, 32), sw_batch_size=2)
    with torch.no_grad():
        out = deconv(torch.rand(shape))
    assert out.shape == shape and out.device.type == "cpu"
    assert 0 <= float(out.min()) and float(out.max()) <= 1


def test_deconvolver_rejects_bad_roi():
    with pytest.raises(ValueError, match="multiples of 16"):
        Deconvolver(DeblurUNet(features=SMALL), roi_size=(32, 30, 32))


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(roi_size=(32, 32, 32), sw_batch_size=2), (1, 1, 20, 70, 45)),  # blended windows
        (dict(roi_size="auto", max_pass_voxels=48 * 64 * 64, auto_min_size=32), (1, 1, 33, 40, 150)),  # planned
    ],
)
def test_callback_reports_every_window_and_can_stop_the_run(kwargs, shape):
    net = DeblurUNet(features=SMALL).eval()
    calls = []
    deconv = Deconvolver(net, callback=lambda done, total: calls.append((done, total)), **kwargs)
    x = torch.rand(shape)
    with torch.no_grad():
        out = deconv(x)
    total = calls[-1][1]
    assert total > 1 and calls[-1][0] == total  # the last call says "all done"
    assert all(t == total for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    seen = []
    inferer_calls = SlidingWindowInferer.__call__

    def spy(self, inputs, network, *a, **k):  # count the windows MONAI really runs
        return inferer_calls(self, inputs, lambda w: (seen.append(w.shape[0]), network(w))[1], *a, **k)

    SlidingWindowInferer.__call__ = spy
    try:
        with torch.no_grad():
            Deconvolver(net, **kwargs)(x)
    finally:
        SlidingWindowInferer.__call__ = inferer_calls
    assert sum(seen) == total  # window_count matches the windows MONAI really runs
    torch.testing.assert_close(out, Deconvolver(net, **kwargs)(x).detach())

    def cancel(done, total):
        if done >= 1:
            raise DeconvolutionCancelled("stopped by the user")

    with pytest.raises(DeconvolutionCancelled, match="stopped"):
        with torch.no_grad():
            Deconvolver(net, callback=cancel, **kwargs)(x)
    assert window_count((32, 64, 64), (32, 32, 32), 0.25) == 9  # 1 x 3 x 3 (MONAI: interval 24)


def _window_free(seed=0):
    """A depth-2 generator with batch norm (non-trivial running statistics) and shift-aligned upsampling."""
    torch.manual_seed(seed)
    net = DeblurUNet(features=(2, 4, 4, 2), depth=2, norm="batch", align_corners=False, out_activation="none")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("shape", [(1, 1, 20, 70, 45), (1, 1, 5, 7, 9)])
def test_output_does_not_depend_on_the_window_plan(shape):
    """With a halo of the receptive radius, 32³ and 64³ tiles, planned windows and one window agree."""
    net = _window_free()
    halo = net.tiling_halo
    assert halo == 26  # the receptive radius of a depth-2 network
    x = torch.rand(shape)
    whole = tuple(-(-(s + 2 * halo) // 4) * 4 for s in shape[2:])
    with torch.no_grad():
        ref = Deconvolver(net, roi_size=whole, precision="float32")(x)
        outs = {
            tile: Deconvolver(net, roi_size=(tile + 2 * halo,) * 3, precision="float32", sw_batch_size=2)(x)
            for tile in (32, 64)
        }
        outs["auto"] = Deconvolver(net, roi_size="auto", precision="float32", max_pass_voxels=300_000)(x)
    for plan, out in outs.items():
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=f"plan {plan}")
    # a halo short of the receptive radius gives a different result: the test can fail
    short = Deconvolver(net, roi_size=(40, 40, 40), halo=4, precision="float32")(x)
    if shape[3] > 40:
        assert float((short - ref).abs().max()) > 1e-4


def test_halo_arguments():
    net = _window_free()
    with pytest.raises(ValueError, match="core smaller than 4"):
        Deconvolver(net, roi_size=(52, 52, 52))  # 52 - 2·26 = 0
    with pytest.raises(ValueError, match="multiple of 2"):
        Deconvolver(net, roi_size=(64, 64, 64), halo=3)
    assert Deconvolver(DeblurUNet(features=SMALL)).halo == 0  # instance norm: MONAI's blending


def _trained_like(seed=0):
    """A small generator with non-trivial InstanceNorm affine weights (as after training)."""
    torch.manual_seed(seed)
    net = DeblurUNet(features=SMALL).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def test_inference_network_same_function():
    """GroupNorm rewrite + channels-last: same output as the module as given; bf16 close to it."""
    net = _trained_like()
    x = torch.rand(2, 1, 32, 48, 32)
    with torch.no_grad():
        ref = net(x)
        fast = InferenceNetwork(net, precision="float32")(x)
        bf16 = InferenceNetwork(net, precision="bfloat16")(x)
    assert fast.dtype == torch.float32 and fast.is_contiguous() and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    with torch.no_grad():  # any input dtype (the plain module refuses float64)
        torch.testing.assert_close(InferenceNetwork(net)(x.double()), fast, rtol=0, atol=1e-6)
    assert bf16.dtype == torch.float32
    assert psnr(bf16, ref) > 35  # bfloat16 has 8 mantissa bits: ~40 dB on random inputs
    assert psnr(bf16, ref) < 200  # and it did run in bfloat16
    # the wrapper adds no state and leaves the original untouched (InstanceNorm, float32, contiguous)
    wrapper = InferenceNetwork(net)
    assert wrapper.state_dict().keys() == {f"network.{k}" for k in net.state_dict()}
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in net.parameters())
    # UpCat's zero-width replicate pad is skipped in the copy of a DeblurUNet (sides checked), not elsewhere
    from monai.networks.nets.basic_unet import UpCat

    assert not any(m.is_pad for m in wrapper.fast_network().modules() if isinstance(m, UpCat))
    assert all(m.is_pad for m in net.modules() if isinstance(m, UpCat))
    other = InferenceNetwork(net.unet).fast_network()  # a bare BasicUNet may see any size: keeps padding
    assert all(m.is_pad for m in other.modules() if isinstance(m, UpCat))


def test_batch_norm_is_folded_into_the_convolutions_with_the_same_output():
    """Batch norm with running statistics disappears from the inference copy (folded into the conv before
    it) and the output is the module's; the original keeps its norms and weights; a norm not right after
    a conv (ADN ordering "AN") is left alone."""
    from monai.networks.blocks import Convolution

    net = _window_free()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 20, 28, 24)
    with torch.no_grad():
        ref = net(x)
        wrapper = InferenceNetwork(net, precision="float32")
        out = wrapper(x)
    fast = wrapper.fast_network()
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == 10  # 5 TwoConvs of 2 convs
    torch.testing.assert_close(dict(net.state_dict()), before, rtol=0, atol=0, equal_nan=True)  # untouched
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (ref - net.unet.final_conv.bias).abs().max() > 1e-2  # the norms did something to fold
    kept_norms = InferenceNetwork(net, precision="float32", fold_batch_norm=False).fast_network()
    with torch.no_grad():  # new running statistics alone (no parameter changed): the folded copy follows
        net.unet.conv_0.conv_0.adn.N.running_mean.add_(0.5)
        torch.testing.assert_close(wrapper(x), net(x), rtol=0, atol=1e-5)
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in kept_norms.modules()) == 10
    torch.manual_seed(0)
    act_first = Convolution(3, 1, 2, adn_ordering="AN", norm="batch", act="relu").eval()
    with torch.no_grad():
        act_first.adn.N.running_mean.fill_(0.5)
        y = torch.randn(1, 1, 4, 4, 4)
        ref2 = act_first(y)
        kept = InferenceNetwork(act_first, precision="float32", channels_last=False)
        torch.testing.assert_close(kept(y), ref2)
    assert isinstance(kept.fast_network().adn.N, torch.nn.BatchNorm3d)


def test_lower_precisions_keep_a_float32_head():
    """In bfloat16 the last 1×1×1 conv runs in float32: a nearly flat output (logits −4 ± 0.01, an early
    model) keeps its variation instead of collapsing onto a few bfloat16 steps."""
    from bundle.inference.precision import Float32Head, _inference_copy

    net = _trained_like()
    with torch.no_grad():
        net.unet.final_conv.weight.mul_(1e-3)
        net.unet.final_conv.bias.fill_(-4.0)
    x = torch.rand(1, 1, 32, 48, 32)
    with torch.no_grad():
        ref = net(x)
        fast = InferenceNetwork(net, precision="bfloat16")
        out = fast(x)
        plain = _inference_copy(net, torch.bfloat16, True)(x.bfloat16()).float()  # without the head
    assert isinstance(fast.fast_network().unet.final_conv, Float32Head)
    assert fast.fast_network().unet.final_conv.conv.weight.dtype == torch.float32
    assert torch.unique(plain).numel() <= 4  # bfloat16 logits near -4 step by 1/32
    assert torch.unique(out).numel() > 1000
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=0)
    assert not isinstance(InferenceNetwork(net, precision="float32").fast_network().unet.final_conv, Float32Head)


def test_inference_network_follows_new_weights():
    """A checkpoint loaded into the network after the wrapper was used is the one that runs."""
    net, other = _trained_like(0), _trained_like(1)
    wrapper = InferenceNetwork(net)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = wrapper(x)
        net.load_state_dict(other.state_dict())
        after = wrapper(x)
        torch.testing.assert_close(after, other(x), rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-3


def test_precision_errors_and_auto():
    with pytest.raises(ValueError, match="float16.*CUDA"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceNetwork(DeblurUNet(features=SMALL), precision="half")
    assert resolve_precision("auto", "cpu") in ("float32", "bfloat16")
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((128, 256, 256), (128, 256, 256)),  # the benchmark volume fits: one window, each voxel once
        ((5, 7, 9), (32, 32, 32)),  # tiny: the smallest valid window
        ((64, 100, 100), (64, 112, 112)),  # rounded up to the divisor
    ],
)
def test_plan_roi_size_cases(shape, expected):
    assert plan_roi_size(shape, max_voxels=1 << 23) == expected


def test_plan_roi_size_bounds():
    for shape, budget in [((300, 1000, 1000), 1 << 23), ((64, 512, 512), 1 << 21), ((200, 90, 700), 1 << 22)]:
        roi = plan_roi_size(shape, max_voxels=budget)
        assert np.prod(roi) <= budget and all(r % 16 == 0 and r >= 64 for r in roi), (shape, roi)
        # no allowed window computes fewer voxels (brute force over the same grid)
        from bundle.inference.windows import _overlap_fraction, _windows_along

        def work(r, shape=shape):
            n = [_windows_along(s, ri, _overlap_fraction(ri, 16)) for s, ri in zip(shape, r)]
            return int(np.prod(n)) * int(np.prod(r))

        sides = [range(64, -(-s // 16) * 16 + 1, 16) for s in shape]
        best = min(work((a, b, c)) for a in sides[0] for b in sides[1] for c in sides[2] if a * b * c <= budget)
        assert work(roi) == best
    with pytest.raises(ValueError, match="max_voxels"):
        plan_roi_size((128, 128, 128), max_voxels=1000)


def test_deconvolver_auto_and_conflicts():
    net = _trained_like()
    auto = Deconvolver(net, roi_size="auto", sw_batch_size=2)
    x = torch.rand(1, 1, 20, 70, 45)
    with torch.no_grad():
        out = auto(x)
        assert out.shape == x.shape and auto.last_roi_size == (32, 80, 48)
        # one window: the same as that fixed window, and as the plain module on the padded volume
        fixed = Deconvolver(net, roi_size=(32, 80, 48), optimize=False)(x)
    torch.testing.assert_close(out, fixed, rtol=0, atol=1e-5)
    assert auto.network is net and Deconvolver(net, optimize=False).network is net
    # a budget smaller than the volume: several windows, each within the budget, seams blended
    small = Deconvolver(net, roi_size="auto", max_pass_voxels=48 * 48 * 48, auto_min_size=32)
    with torch.no_grad():
        tiled = small(torch.rand(1, 1, 40, 90, 60))
    assert tiled.shape == (1, 1, 40, 90, 60) and np.prod(small.last_roi_size) <= 48**3
    # a window with an inferer: the window wins, the inferer's other settings stay (the README's override)
    both = Deconvolver(net, inferer=SlidingWindowInferer((32, 32, 32), sw_batch_size=3, mode="gaussian"), roi_size=(64, 64, 64))
    assert both.roi_size == (64, 64, 64) and both.inferer.sw_batch_size == 3 and both.inferer.mode == "gaussian"
    with pytest.raises(ValueError, match="'auto'"):
        Deconvolver(net, roi_size="big")


def test_axes_and_output_range(small_model):
    vol = _volume((10, 24, 20))
    kw = dict(model=small_model, roi_size=(32, 32, 32), progress=False)
    ref = deconvolve(vol, **kw)
    assert ref.shape == vol.shape and ref.dtype == np.float32
    np.testing.assert_array_equal(deconvolve(np.transpose(vol, (1, 2, 0)), axes="YXZ", **kw), np.transpose(ref, (1, 2, 0)))
    np.testing.assert_array_equal(deconvolve(vol.T, axes="XYZ", **kw), ref.T)
    two = np.stack([np.zeros_like(vol), vol])
    np.testing.assert_array_equal(deconvolve(two, axes="CZYX", channel=1, **kw), ref[None])
    with pytest.raises(VolumeError, match="channel"):
        deconvolve(two, axes="CZYX", **kw)
    with pytest.raises(ValueError, match="axes"):
        deconvolve(vol, axes="ZY", **kw)
    # "input": the [0, 1] output mapped to the input's (0.1, 99.9) percentile values
    norm = deconvolve(vol, output_range="normalized", **kw)
    lo, hi = np.percentile(vol, 0.1), np.percentile(vol, 99.9)
    np.testing.assert_allclose(ref, norm * (hi - lo) + lo, rtol=1e-5, atol=1e-4)
    assert 0 <= norm.min() and norm.max() <= 1


def test_checkpoint_errors_name_the_file(tmp_path, small_model):
    with pytest.raises(ValueError, match=str(small_model)):
        load_checkpoint(DeblurUNet(features=(16, 16, 32, 64, 128, 16)), small_model)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_network(junk)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_network(tmp_path / "nothing.pt")


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["2d"] = folder / "flat.tif"
    tifffile.imwrite(files["2d"], _volume((20, 20)))
    files["4d"] = folder / "multichannel.tif"
    tifffile.imwrite(files["4d"], _volume((4, 2, 16, 16)), imagej=True, metadata={"axes": "ZCYX", "mode": "composite"})
    nan = _volume((4, 16, 16))
    nan[0, 0, 0] = np.nan
    files["nan"] = folder / "nan.tif"
    tifffile.imwrite(files["nan"], nan)
    files["constant"] = folder / "constant.tif"
    tifffile.imwrite(files["constant"], np.full((4, 16, 16), 3, np.float32))
    files["empty"] = folder / "empty.tif"
    files["empty"].write_bytes(b"")
    files["truncated"] = folder / "truncated.tif"
    tifffile.imwrite(files["truncated"], _volume((8, 64, 64)))
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:20000])
    files["unknown"] = folder / "volume.xyz"
    files["unknown"].write_bytes(b"1234")
    return files


def test_bad_inputs_named_and_nothing_written(tmp_path):
    files = _bad_files(tmp_path / "in")
    out = tmp_path / "out"
    for kind, path in files.items():
        with pytest.raises((VolumeError, FileNotFoundError)) as err:
            inference_datalist(str(path), out)
        assert str(path) in str(err.value) or path.name in str(err.value), kind
    assert not out.exists()
    # an output that would overwrite its input
    good = save_volume(tmp_path / "in2" / "a.tif", _volume((4, 16, 16)))
    with pytest.raises(VolumeError, match="overwrite an input"):
        inference_datalist(str(good), good.parent, suffix="")
    assert output_path("x/a.ome.tif", "o") == Path("o/a_deconv.tif")
    assert output_path("x/a.nii.gz", "o") == Path("o/a_deconv.nii.gz")


def test_workflow_properties_and_checkpoint_mismatch(tmp_path, monkeypatch):
    """The inference config has the zoo ids; a checkpoint of another network fails, naming it, writing nothing."""
    from bundle.networks import MultiScalePatchDiscriminator

    monkeypatch.chdir(ROOT)
    foreign = tmp_path / "d.pt"
    torch.save(MultiScalePatchDiscriminator(channels=4, num_layers_d=2).state_dict(), foreign)
    save_volume(tmp_path / "in" / "a.tif", _volume((8, 24, 24)), voxel_size=(0.2, 0.1, 0.1))
    wf = ConfigWorkflow(
        config_file=["configs/common.json", "configs/inference.json"], workflow_type="infer",
        input=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), ckpt_path=str(foreign), progress=False,
    )
    wf.initialize()
    assert not wf.check_properties()
    for key in ("network_def", "network", "inferer", "preprocessing", "postprocessing", "dataset", "evaluator"):
        assert wf.parser.get(key) is not None, key
    # the model zoo's wiring: the evaluator runs the network itself through a MONAI Inferer
    inferer, evaluator = wf.parser.get_parsed_content("inferer"), wf.parser.get_parsed_content("evaluator")
    assert type(inferer).__name__ == "TiledInferer" and inferer.optimize and inferer.allocator == "reuse"
    assert evaluator.network is wf.parser.get_parsed_content("network") and evaluator.inferer is inferer
    with pytest.raises(RuntimeError) as err:
        wf.run()
    chain, e = [], err.value
    while e is not None:  # the config parser wraps the handler's error
        chain.append(str(e))
        e = e.__cause__
    assert any(msg.startswith(f"{foreign}: checkpoint does not match") for msg in chain), chain
    assert not (tmp_path / "out").exists()


def test_cli_reads_sizes_settings_and_voxel_size_from_the_checkpoint(tmp_path, monkeypatch, caplog):
    """A model of other sizes (e.g. quick.json's) runs without its configs; a stack of another voxel size warns."""
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    net = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False, voxel_size=(0.1, 0.1, 0.1))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)  # an untrained net's output is nearly constant
    torch.save(net.eval().state_dict(), tmp_path / "model.pt")
    volume = _volume((8, 24, 24))
    save_volume(tmp_path / "in" / "a.tif", volume, voxel_size=(0.2, 0.1, 0.1))
    wf = ConfigWorkflow(
        config_file=["configs/common.json", "configs/inference.json"], workflow_type="infer",
        input=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), ckpt_path=str(tmp_path / "model.pt"),
        progress=False, logging_file=False,
    )  # fmt: skip
    wf.initialize()
    with caplog.at_level("WARNING"):
        wf.run()
    (out,) = (tmp_path / "out").glob("*.tif")
    expected = deconvolve(volume, model=tmp_path / "model.pt")
    np.testing.assert_allclose(load_volume(out)[0], expected, rtol=1e-4, atol=1e-4)
    warning = [r.getMessage() for r in caplog.records if "voxel size" in r.getMessage()]
    assert len(warning) == 1 and "a.tif" in warning[0] and "(0.2, 0.1, 0.1)" in warning[0] and "(0.1, 0.1, 0.1)" in warning[0]


def test_checkpoints_without_a_voxel_size_still_load_and_do_not_warn(tmp_path, caplog):
    from bundle.io import CheckVoxelSized

    old = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False)
    state = {k: v for k, v in old.state_dict().items() if k != "voxel_size"}  # written before the buffer existed
    net = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", align_corners=False, voxel_size=(0.1, 0.1, 0.1))
    net.load_state_dict(state)
    assert net.trained_voxel_size is None
    path = save_volume(tmp_path / "a.tif", _volume((8, 24, 24)), voxel_size=(0.2, 0.1, 0.1))
    with caplog.at_level("WARNING"):
        Compose([LoadVolumed("image"), CheckVoxelSized("image", reference=net)])({"image": str(path)})
        Compose([LoadVolumed("image"), CheckVoxelSized("image", reference=(0.2, 0.1, 0.1))])({"image": str(path)})
    assert not caplog.records
    with caplog.at_level("WARNING"):
        Compose([LoadVolumed("image"), CheckVoxelSized("image", reference=(0.1, 0.1, 0.1), what="the configured voxel_size")])(
            {"image": str(path)}
        )
    assert "the configured voxel_size (0.1, 0.1, 0.1)" in caplog.records[0].getMessage()


def test_cli_bad_file_in_folder_writes_nothing(tmp_path, small_model):
    folder = tmp_path / "in"
    save_volume(folder / "good.tif", _volume((8, 24, 24)))
    tifffile.imwrite(folder / "zz_nan.tif", np.full((4, 16, 16), np.nan, np.float32))
    args = ["run", "inference", "--config_file", "['configs/common.json','configs/inference.json']", "--input", str(folder),
            "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(small_model)]  # fmt: skip
    res = run_module("monai.bundle", args, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode != 0
    assert "zz_nan.tif" in res.stderr and "NaN" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_done_when_64x256x256_cli_equals_python(quick_model, tmp_path):
    """A trained quick model deconvolves a 64×256×256 stack from the CLI and from Python identically."""
    from bundle.physics.forward import simulate_acquisition
    from bundle.physics.phantom import microtubule_phantom

    psf, meta = load_volume(Path(quick_model["dataset_dir"]) / "psf.tif")
    sharp = microtubule_phantom((64, 256, 256), seed=11)
    blurred, _ = simulate_acquisition(sharp, psf, 20.0, seed=12)
    stack = save_volume(tmp_path / "in" / "stack.tif", blurred, voxel_size=(0.1, 0.1, 0.1))
    before = (stack.read_bytes(), os.stat(stack).st_mtime_ns)

    out_dir = tmp_path / "out"
    # two views (a mirror in X) on both sides: the view averaging is exercised at a quarter of the
    # default's cost on this large stack (all eight views: tests/test_flips.py)
    run_bundle("inference", QUICK, "--input", str(stack), "--output_dir", str(out_dir),
               "--ckpt_dir", str(quick_model["ckpt_dir"]), "--progress", "false", "--inference_flips", "2")
    cli, cli_meta = load_volume(out_dir / "stack_deconv.tif", dtype=None)
    assert sorted(os.listdir(out_dir)) == ["stack_deconv.tif"]
    assert (stack.read_bytes(), os.stat(stack).st_mtime_ns) == before
    assert cli.shape == (64, 256, 256) and cli.dtype == np.float32
    assert cli_meta["voxel_size"] == pytest.approx((0.1, 0.1, 0.1))

    py = deconvolve(blurred, model=Path(quick_model["ckpt_dir"]) / "model.pt",
                    sw_batch_size=4, device="cpu", progress=False, flips=2)
    np.testing.assert_allclose(py, cli, rtol=0, atol=1e-6 * float(np.abs(cli).max()))

    # PSNR, normalisation stated: input (0.1, 99.9) percentiles -> [0, 1], output = the network's [0, 1]
    # (the restored output mapped back by the same percentiles), ground truth (0, 99.99) -> [0, 1];
    # MAX = ground-truth range; the input also at its best affine scaling
    lo, hi = np.percentile(blurred, 0.1), np.percentile(blurred, 99.9)
    x = torch.from_numpy(np.clip((blurred - lo) / (hi - lo), 0, 1))[None, None]
    out = torch.from_numpy((cli - lo) / (hi - lo))[None, None]
    gt = torch.from_numpy(np.clip(sharp / np.percentile(sharp, 99.99), 0, 1))[None, None]
    p_in, p_fit, p_out = psnr(x, gt), psnr(affine_fit(x, gt), gt), psnr(out, gt)
    print(f"64x256x256: PSNR input {p_in:.2f} / input affine-fit {p_fit:.2f} / output {p_out:.2f} dB")
    assert p_out > p_fit and p_out > p_in


def test_output_folder_and_extension_are_checked_before_compute_and_nothing_is_created(tmp_path):
    from bundle.inference import check_output_dir

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"\.xyz"):
        check_output_dir(tmp_path / "o", ".xyz")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(VolumeError, match="is a file"):
            check_output_dir(bad)
    assert check_output_dir(tmp_path / "new" / "deeper", ".nii.gz") == tmp_path / "new" / "deeper"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created, no probe left


def test_a_missing_checkpoint_under_a_relative_bundle_root_names_the_folder_and_bundle_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--bundle_root") as err:
        load_checkpoint(DeblurUNet(features=SMALL), "models/model.pt")
    assert str(tmp_path / "models" / "model.pt") in str(err.value)


def test_from_bundle_loads_once_and_predicts_like_deconvolve(tmp_path, monkeypatch):
    """CARE-style: ``Deconvolver.from_bundle(path).predict(stack, axes=...)`` loads the model once
    for any number of stacks and gives what ``deconvolve`` gives."""
    import bundle.inference.api as api

    torch.manual_seed(0)
    net = DeblurUNet(features=(4, 4, 8, 8, 16, 4)).eval()
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    loads = []
    real = api.load_network
    monkeypatch.setattr(api, "load_network", lambda *a, **k: loads.append(a) or real(*a, **k))
    stacks = [_volume((20, 40, 36), seed=s).transpose(1, 2, 0) for s in (1, 2)]  # Y, X, Z
    deconv = Deconvolver.from_bundle(tmp_path / "model.pt", device="cpu", progress=False, precision="float32")
    outs = [deconv.predict(v, axes="YXZ") for v in stacks]
    assert len(loads) == 1 and all(o.shape == v.shape for o, v in zip(outs, stacks))
    for v, o in zip(stacks, outs):
        np.testing.assert_allclose(o, deconvolve(v, tmp_path / "model.pt", axes="YXZ", device="cpu", progress=False,
                                                 precision="float32"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="axes"):
        deconv.predict(stacks[0], axes="ZYX ")


def test_the_generator_carries_its_input_range_to_inference(tmp_path):
    from bundle.inference import NormalizePercentilesd, network_from_state_dict

    net = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", input_range=(10.0, 110.0))
    assert net.trained_input_range == (10.0, 110.0)
    rebuilt = network_from_state_dict(net.state_dict())
    assert rebuilt.trained_input_range == (10.0, 110.0)
    image = torch.full((1, 4, 8, 8), 60.0)
    image[0, 0, 0, 0] = 1000.0  # a per-volume percentile normalisation would move with this voxel
    d = NormalizePercentilesd("image", intensity_range=rebuilt)({"image": image})
    assert float(d["image"][0, 1, 1, 1]) == pytest.approx(0.5) and d["image_range"].tolist() == [10.0, 110.0]
    old = {k: v for k, v in net.state_dict().items() if k != "input_range"}  # written before the buffer existed
    fresh = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch")
    fresh.load_state_dict(old)
    assert fresh.trained_input_range is None and network_from_state_dict(old).trained_input_range is None
    per_volume = NormalizePercentilesd("image", (0.0, 100.0), intensity_range=fresh)({"image": image})
    assert per_volume["image_range"].tolist() == [60.0, 1000.0]
    with pytest.raises(ValueError, match="input_range"):
        DeblurUNet(features=(4, 8, 16, 4), depth=2, input_range=(1.0, 0.0))


def test_a_stack_outside_the_models_fixed_range_is_named_in_a_warning(caplog):
    from bundle.inference import NormalizePercentilesd

    normalize = NormalizePercentilesd("image", intensity_range=(0.0, 100.0))
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        normalize({"image": torch.as_tensor(rng.random((1, 8, 16, 16)) * 90.0)})
    assert not caplog.records
    from monai.data import MetaTensor

    bright = MetaTensor(torch.as_tensor(rng.random((1, 8, 16, 16)) * 4000.0), meta={"filename_or_obj": "bright.tif"})
    with caplog.at_level("WARNING"):
        out = normalize({"image": bright})
    assert "bright.tif" in caplog.records[0].getMessage() and "0..100" in caplog.records[0].getMessage()
    assert float(out["image"].max()) == 1.0  # still normalised (clipped), the warning says why it may look saturated


def test_a_torchscript_export_keeps_the_input_range():
    from bundle.inference.transforms import trained_input_range

    net = DeblurUNet(features=(4, 8, 16, 4), depth=2, norm="batch", input_range=(10.0, 110.0)).eval()
    scripted = torch.jit.script(net)
    assert trained_input_range(scripted) == (10.0, 110.0) == trained_input_range(net)
    assert trained_input_range(DeblurUNet(features=(4, 8, 16, 4), depth=2)) is None
    assert trained_input_range(torch.nn.Linear(2, 2)) is None


def test_deconvolve_applies_the_refinement_tuned_for_a_model_folder(quick_model, tmp_path):
    """A model folder with ``refinement.json`` is refined by ``deconvolve`` as ``run inference`` refines it
    (RL started from G's output through ``blur.tif``); 0 or a module: G alone; errors are named."""
    import shutil

    from bundle.classical import PSFRefinement, refine_estimate

    folder = tmp_path / "bundle" / "models"  # a copy: the shared model's folder must stay unrefined
    shutil.copytree(quick_model["ckpt_dir"], folder, ignore=shutil.ignore_patterns("checkpoints"))
    vol = load_volume(sorted((Path(quick_model["dataset_dir"]) / "test" / "blurred").iterdir())[0])[0]
    kw = dict(progress=False, device="cpu", precision="float32", output_range="normalized", flips=1)  # one view
    plain = deconvolve(vol, folder / "model.pt", **kw)
    assert checkpoint_folder(tmp_path / "bundle") == folder == checkpoint_folder(folder / "model.pt")
    assert model_refinement(tmp_path / "bundle") is None  # nothing tuned: G alone
    (folder / "refinement.json").write_text('{"iterations": 4}')
    refinement = model_refinement(tmp_path / "bundle")
    assert isinstance(refinement, PSFRefinement) and refinement.num_iter == 4
    refined = deconvolve(vol, tmp_path / "bundle", **kw)
    lo, hi = np.percentile(vol, 0.1), np.percentile(vol, 99.9)
    stack = np.clip((vol - lo) / (hi - lo), 0, 1)
    psf = load_volume(folder / "blur.tif")[0]
    np.testing.assert_allclose(refined, refine_estimate(stack, plain, psf, num_iter=4), rtol=1e-4, atol=1e-5)
    assert np.abs(refined - plain).max() > 1e-3
    np.testing.assert_array_equal(deconvolve(vol, folder, refine_iterations=0, **kw), plain)
    net = load_network(folder / "model.pt")
    assert model_refinement(net) is None and model_refinement(tmp_path / "bundle.zip") is None
    with pytest.raises(ValueError, match="needs a PSF"):
        deconvolve(vol, net, refine_iterations=3, **kw)
    with pytest.raises(ValueError, match="refine_iterations"):
        model_refinement(folder, refine_iterations="many")
    (folder / "refinement.json").write_text('{"iteration": 4}')
    with pytest.raises(ValueError, match="refinement.json"):
        deconvolve(vol, folder, **kw)

"""CycleGANTrainer: one iteration in each mode, parameter groups, checkpoint/resume in-process."""

import copy

import pytest
import torch

from bundle.engine import CycleGANKeys, CycleGANTrainer, discriminator_parameters, generator_param_groups
from bundle.handlers import ResumableCheckpoint
from bundle.image_pool import ImagePool
from bundle.losses import CycleLoss, WGANGPLoss
from bundle.networks import DeblurUNet, MultiScalePatchDiscriminator, PoissonGaussianNoise, PSFLayer

FEATURES = (4, 4, 8, 8, 16, 4)


def _loader(n=2, batch=2, size=32):
    g = torch.Generator().manual_seed(0)
    return [
        {"sharp": torch.rand(batch, 1, size, size, size, generator=g), "blurred": torch.rand(batch, 1, size, size, size, generator=g)}
        for _ in range(n)
    ]


def _build(mode: str, adversarial=None, loader=None, max_epochs=1, blur_noise=None, **trainer_kwargs):
    torch.manual_seed(0)
    g = DeblurUNet(features=FEATURES)
    if mode == "conventional":
        blur = DeblurUNet(features=FEATURES)
    elif mode == "blind":
        blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="parametric", na=1.1)
    elif mode == "constrained":
        blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="constrained", init="gaussian")
    else:
        blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", init="born_wolf")
    d_sharp = MultiScalePatchDiscriminator(channels=4, num_layers_d=2)
    d_blurred = None if mode == "nonblind" else MultiScalePatchDiscriminator(channels=4, num_layers_d=2)
    g_opt = torch.optim.Adam(generator_param_groups(g, blur, lr=1e-3, psf_lr=2e-2, scale_lr=1e-3), betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator_parameters(d_sharp, d_blurred), lr=1e-3)
    trainer = CycleGANTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader or _loader(),
        g_deblur=g,
        blur=blur,
        d_sharp=d_sharp,
        d_blurred=d_blurred,
        blur_noise=blur_noise,
        g_optimizer=g_opt,
        d_optimizer=d_opt,
        adversarial_loss=adversarial,
        sharp_pool=ImagePool(pool_size=4, seed=0),
        blurred_pool=ImagePool(pool_size=4, seed=1),
        **trainer_kwargs,
    )
    return trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("mode", ["nonblind", "blind", "constrained", "conventional"])
def test_one_iteration_updates_the_right_networks(mode):
    trainer = _build(mode, loader=_loader(n=1))
    before = {n: _params(getattr(trainer, n)) for n in ("g_deblur", "blur", "d_sharp")}
    d_blurred_before = _params(trainer.d_blurred) if trainer.d_blurred is not None else None
    trainer.run()
    out = trainer.state.output[0]  # decollated: one dict per sample, losses repeated
    k = CycleGANKeys
    for key in (k.LOSS, k.G_LOSS, k.D_LOSS, k.CYCLE_SHARP, k.CYCLE_BLURRED, k.ADV_SHARP, k.D_SHARP):
        assert torch.isfinite(torch.as_tensor(out[key])), key
    assert tuple(out[k.PRED].shape) == (1, 32, 32, 32)
    assert _changed(before["g_deblur"], trainer.g_deblur)
    assert _changed(before["d_sharp"], trainer.d_sharp)
    if mode == "nonblind":
        assert not trainer.blind and k.D_BLURRED not in out
        torch.testing.assert_close(trainer.blur.kernel(), PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", init="born_wolf").kernel())
    else:
        assert trainer.blind and torch.isfinite(torch.as_tensor(out[k.D_BLURRED]))
        assert _changed(d_blurred_before, trainer.d_blurred)
        assert _changed(before["blur"], trainer.blur)
    if mode in ("blind", "constrained"):
        kernel = trainer.blur.kernel().detach()
        assert torch.isfinite(kernel).all() and kernel.min() >= 0
        assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-5)
    if mode == "blind":
        assert trainer.blur.physical_parameters()["na"] != pytest.approx(1.1, abs=1e-7)


def test_cycle_losses_are_weighted_l1():
    trainer = _build("nonblind", loader=_loader(n=1))
    trainer.run()
    out = trainer.state.output[0]
    # g_loss = cycles + adversarial terms (weight 1); the cycle terms carry gamma = 10
    total = out[CycleGANKeys.CYCLE_SHARP] + out[CycleGANKeys.CYCLE_BLURRED] + out[CycleGANKeys.ADV_SHARP]
    assert float(out[CycleGANKeys.G_LOSS]) == pytest.approx(float(total), rel=1e-5)
    assert trainer.cycle_loss.weight == 10.0


def test_wgan_gp_and_blur_noise_options_run():
    trainer = _build("blind", adversarial=WGANGPLoss(), loader=_loader(n=1), blur_noise=PoissonGaussianNoise(photons_per_unit=100.0, gaussian_sigma=0.01))
    trainer.run()
    assert torch.isfinite(torch.as_tensor(trainer.state.output[0][CycleGANKeys.D_LOSS]))


def test_missing_batch_key_is_a_clear_error():
    trainer = _build("nonblind", loader=[{"sharp": torch.rand(2, 1, 32, 32, 32)}])
    with pytest.raises(KeyError, match="blurred"):
        trainer.run()


def test_param_groups_give_the_psf_its_learning_rate():
    g = DeblurUNet(features=FEATURES)
    blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="parametric")
    groups = generator_param_groups(g, blur, lr=1e-3, psf_lr=2e-2, scale_lr=5e-3)
    assert [grp["lr"] for grp in groups] == [1e-3, 2e-2, 5e-3]
    fixed = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="fixed", init="gaussian", learn_gain=False, learn_offset=False)
    assert len(generator_param_groups(g, fixed, lr=1e-3)) == 1
    assert discriminator_parameters(None, torch.nn.Linear(2, 2))


def test_checkpoint_resume_continues_exactly(tmp_path):
    loader = _loader(n=2)
    # uninterrupted reference: 2 epochs
    ref = _build("blind", loader=loader, max_epochs=2)
    ref.run()
    # interrupted: 1 epoch with checkpoints, then a fresh process-like rebuild resumes for epoch 2
    first = _build("blind", loader=loader, max_epochs=1)
    save = {"g_deblur": first.g_deblur, "blur": first.blur, "d_sharp": first.d_sharp, "d_blurred": first.d_blurred,
            "g_optimizer": first.g_optimizer, "d_optimizer": first.d_optimizer}
    ResumableCheckpoint(str(tmp_path), save).attach(first)
    first.run()
    assert (tmp_path / "checkpoint_2.pt").is_file()
    second = _build("blind", loader=loader, max_epochs=2)
    save2 = {"g_deblur": second.g_deblur, "blur": second.blur, "d_sharp": second.d_sharp, "d_blurred": second.d_blurred,
             "g_optimizer": second.g_optimizer, "d_optimizer": second.d_optimizer}
    handler = ResumableCheckpoint(str(tmp_path), copy.copy(save2), resume=True)
    handler.attach(second)
    second.run()
    assert second.state.iteration == 4 and second.state.epoch == 2
    for a, b in zip(ref.g_deblur.state_dict().values(), second.g_deblur.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert ref.blur.physical_parameters()["na"] == pytest.approx(second.blur.physical_parameters()["na"], abs=1e-5)
    assert handler.latest().name == "checkpoint_4.pt"


def test_resume_from_a_foreign_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"g_deblur": {"nope": torch.zeros(1)}}, tmp_path / "checkpoint_5.pt")
    trainer = _build("nonblind", loader=_loader(n=1))
    ResumableCheckpoint(str(tmp_path), {"g_deblur": trainer.g_deblur}, resume=True).attach(trainer)
    with pytest.raises(RuntimeError, match="checkpoint_5.pt"):
        trainer.run()


@pytest.mark.parametrize("mode", ["blind", "nonblind"])
def test_generator_gradient_equals_one_backward_of_the_summed_loss(mode):
    """The trainer backpropagates the x- and y-cycle terms one after the other (half the activation
    memory); G's and h's gradients must be those of the summed loss in a single backward."""
    trainer = _build(mode, loader=_loader(n=1))
    batch = trainer.data_loader[0]
    x, y = batch["sharp"], batch["blurred"]
    g, blur = copy.deepcopy(trainer.g_deblur), copy.deepcopy(trainer.blur)
    d_sharp = copy.deepcopy(trainer.d_sharp).requires_grad_(False)
    d_blurred = copy.deepcopy(trainer.d_blurred).requires_grad_(False) if trainer.blind else None
    hx = blur(x)
    gy = g(y)
    adv = trainer.adversarial_loss.generator_loss(d_sharp(gy))
    if d_blurred is not None:
        adv = adv + trainer.adversarial_loss.generator_loss(d_blurred(hx))
    loss = trainer.cycle_loss(g(hx), x) + trainer.cycle_loss(blur(gy), y) + trainer.adversarial_weight * adv
    loss.backward()
    seen = {}  # the gradients the G optimizer steps with (they are freed right after the step)

    def capture(optimizer, args, kwargs):
        for net in (trainer.g_deblur, trainer.blur):
            for p in net.parameters():
                seen[p] = None if p.grad is None else p.grad.clone()

    trainer.g_optimizer.register_step_pre_hook(capture)
    trainer.run()  # one iteration
    for ours, ref in ((trainer.g_deblur, g), (trainer.blur, blur)):
        pairs = [(seen[a], b.grad) for a, b in zip(ours.parameters(), ref.parameters()) if b.grad is not None]
        assert pairs and all(a is not None for a, _ in pairs)
        got, want = (torch.cat([t.flatten() for t in ts]) for ts in zip(*pairs))
        # biases before InstanceNorm have a zero gradient up to rounding: compare on the module's scale
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * float(want.abs().max()))
    assert float(trainer.state.output[0][CycleGANKeys.G_LOSS]) == pytest.approx(float(loss.detach()), rel=1e-5)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_are_freed_after_each_step(set_to_none):
    """With ``optim_set_to_none`` (the default) no gradient outlives its optimizer's step: the
    discriminators' gradients must not sit in memory through the generator step (the peak)."""
    trainer = _build("blind", loader=_loader(n=2, batch=1))  # two iterations: D has stepped before the 2nd G step
    trainer.optim_set_to_none = set_to_none
    grads_at_g_step = {}

    def capture(optimizer, args, kwargs):
        grads_at_g_step.update({id(p): p.grad for d in (trainer.d_sharp, trainer.d_blurred) for p in d.parameters()})

    trainer.g_optimizer.register_step_pre_hook(capture)
    trainer.run()
    nets = (trainer.g_deblur, trainer.blur, trainer.d_sharp, trainer.d_blurred)
    kept = [p.grad is not None for n in nets for p in n.parameters() if p.requires_grad]
    during = [g is not None for g in grads_at_g_step.values()]
    if set_to_none:
        assert not any(kept) and not any(during)
    else:  # zeroed in place, kept allocated: the switch still means what it says
        assert all(kept) and all(during)


def _generator_grads(trainer) -> dict[str, list[torch.Tensor]]:
    """Run ``trainer`` (one iteration) and return G's and h's gradients at its generator step."""
    seen = {}
    trainer.g_optimizer.step = lambda *a, **k: seen.update(
        g=[p.grad.clone() for p in trainer.g_deblur.parameters() if p.grad is not None],
        h=[p.grad.clone() for p in trainer.blur.kernel_parameters() if p.grad is not None],
    )
    trainer.run()
    return seen


def test_blur_adversarial_weight_moves_only_the_psf():
    """h's adversarial term has its own weight; it reaches h's gradient and not G's."""
    grads = {}
    for w in (0.0, 5.0):
        trainer = _build("blind", loader=_loader(n=1))
        trainer.blur_adversarial_weight = w
        grads[w] = _generator_grads(trainer)
    for a, b in zip(grads[0.0]["g"], grads[5.0]["g"], strict=True):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0]["h"], grads[5.0]["h"], strict=True))
    assert _build("blind").blur_adversarial_weight == 1.0  # default: adversarial_weight


def test_sharp_cycle_trains_blur_false_keeps_the_sharp_cycle_out_of_h():
    """With only the sharp cycle weighted, h gets a gradient from it by default (the paper) and none
    when ``sharp_cycle_trains_blur`` is False; G's gradient is the same either way."""
    grads = {}
    for trains in (True, False):
        trainer = _build("blind", loader=_loader(n=1))
        trainer.sharp_cycle_trains_blur = trains
        trainer.adversarial_weight = trainer.blur_adversarial_weight = 0.0
        trainer.blurred_cycle_loss = lambda pred, target: 0.0 * pred.sum()
        grads[trains] = _generator_grads(trainer)
    for a, b in zip(grads[True]["g"], grads[False]["g"], strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in grads[True]["h"])
    assert all(g.abs().sum() == 0 for g in grads[False]["h"])
    assert _build("blind").sharp_cycle_trains_blur is True


@pytest.mark.parametrize("value,expected", [("false", False), ("False", False), (0, False), ("true", True), (True, True)])
def test_sharp_cycle_trains_blur_reads_command_line_strings(value, expected):
    """``--sharp_cycle_trains_blur false`` arrives as the string 'false', which bool() reads as True."""
    assert _build("blind", sharp_cycle_trains_blur=value).sharp_cycle_trains_blur is expected
    with pytest.raises(ValueError, match="sharp_cycle_trains_blur"):
        _build("blind", sharp_cycle_trains_blur="flase")


def test_a_sharp_margin_blurs_the_larger_crop_and_keeps_its_centre():
    """x crops of 32 + 2·8 laterally: h*x is computed on the whole crop, then x and h*x are cut to the
    blurred crop's 32³ centre, where the blur holds the light of structure outside it."""
    from bundle.engine.steps import centre_crop

    g = torch.Generator().manual_seed(0)
    big = torch.rand(1, 1, 32, 48, 48, generator=g)
    loader = [{"sharp": big, "blurred": torch.rand(1, 1, 32, 32, 32, generator=g)}]
    trainer = _build("nonblind", loader=loader)
    seen = {}
    real_blur = trainer.blur.forward
    trainer.blur.forward = lambda v: seen.setdefault("blur_input", v) is not None and real_blur(v)
    trainer.run()
    out = trainer.state.output[0]
    assert tuple(seen["blur_input"].shape[2:]) == (32, 48, 48)  # the blur saw the whole sharp crop
    assert tuple(out[CycleGANKeys.SHARP].shape) == (1, 32, 32, 32)  # x was cut to the centre
    torch.testing.assert_close(out[CycleGANKeys.SHARP], big[0, :, :, 8:40, 8:40])
    # the centre of the blurred larger crop differs from blurring the centre alone (the border light)
    with torch.no_grad():
        inside = centre_crop(trainer.blur(big), (32, 32, 32))
        alone = trainer.blur(big[:, :, :, 8:40, 8:40])
    assert float((inside - alone).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="smaller than the blurred crop"):
        centre_crop(torch.zeros(1, 1, 8, 8, 8), (8, 16, 16))


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_a_zero_blurred_cycle_skips_blurring_g_of_y(weight):
    """The non-blind default has no blurred cycle: h*G(y) is then not computed (one blur per iteration)."""
    trainer = _build("nonblind", loader=_loader(n=1), blurred_cycle_loss=CycleLoss(weight=weight))
    calls = []
    trainer.blur.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    trainer.run()
    out = trainer.state.output[0]
    assert len(calls) == (1 if weight == 0 else 2)
    assert (float(out[CycleGANKeys.CYCLE_BLURRED]) == 0.0) == (weight == 0)
    assert torch.isfinite(torch.as_tensor(out[CycleGANKeys.G_LOSS]))


def test_recorrupted_blurred_cycle_feeds_g_the_input_and_compares_with_the_target():
    """``blurred_recorruption``: G's y-cycle input is ``y + αz`` and ``h*G(·)`` is compared with ``y − z/α``."""
    from bundle.networks import Recorruption

    noise = PoissonGaussianNoise(photons_per_unit=100.0, gaussian_sigma=0.05)
    loader = _loader(n=1)
    y = loader[0]["blurred"]
    trainer = _build("nonblind", loader=loader, blur_noise=noise, blurred_cycle_loss=CycleLoss(weight=1.0, power=2),
                     blurred_recorruption=Recorruption(noise=noise, alpha=0.5))  # fmt: skip
    inputs, compared = [], []
    trainer.g_deblur.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach().clone()))
    trainer.blurred_cycle_loss.register_forward_hook(lambda module, args, out: compared.append(args[1].detach().clone()))
    trainer.run()
    y_in, y_target = inputs[-1], compared[-1]  # G's second call per iteration is the y-cycle
    assert y_in.shape == y.shape and not torch.equal(y_in, y) and not torch.equal(y_target, y)
    torch.testing.assert_close(y_in - y, -0.25 * (y_target - y))  # y + αz and y − z/α: the same z
    assert float((y_in - y).std()) > 0.01
    assert torch.isfinite(torch.as_tensor(trainer.state.output[0][CycleGANKeys.CYCLE_BLURRED]))


def test_feature_matching_reaches_g_and_is_logged():
    """``feature_matching`` adds the matching of φ's mean features on G(y) and on x to G's loss: logged,
    it changes G's gradient; weight 0 (the default) computes nothing; a φ without ``features`` is refused."""
    from bundle.losses import FeatureMatchingLoss

    grads, outputs = {}, {}
    for w in (0.0, 1.0):
        trainer = _build("nonblind", loader=_loader(n=1), feature_matching=FeatureMatchingLoss(weight=w))
        grads[w] = _generator_grads(trainer)
        outputs[w] = trainer.state.output[0]
    assert float(outputs[0.0][CycleGANKeys.FEATURE_MATCHING]) == 0.0
    assert float(outputs[1.0][CycleGANKeys.FEATURE_MATCHING]) > 0.0
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0]["g"], grads[1.0]["g"], strict=True))
    base = _build("nonblind", loader=_loader(n=1))
    assert base.feature_matching is None
    plain = torch.nn.Conv3d(1, 1, 3)  # a discriminator without per-layer features
    with pytest.raises(TypeError, match="features"):
        CycleGANTrainer(device="cpu", max_epochs=1, train_data_loader=_loader(n=1), g_deblur=base.g_deblur, blur=base.blur,
                        d_sharp=plain, g_optimizer=base.g_optimizer, d_optimizer=base.d_optimizer,
                        feature_matching=FeatureMatchingLoss(weight=1.0))  # fmt: skip


def test_unpaired_crops_feed_the_unpaired_terms_and_the_sharp_cycle_keeps_its_own():
    """A batch with ``sharp_unpaired``/``blurred_unpaired``: G's sharp cycle sees h*x of ``sharp``; G(y),
    h's adversarial view and both discriminators see the unpaired crops; without them nothing changes."""
    g = torch.Generator().manual_seed(1)
    base = _loader(n=1, batch=1)[0]
    other = {"sharp_unpaired": torch.rand(1, 1, 32, 32, 32, generator=g), "blurred_unpaired": torch.rand(1, 1, 32, 32, 32, generator=g)}
    trainer = _build("blind", loader=[{**base, **other}])
    g_inputs, blur_inputs, d_sharp_inputs, d_blurred_inputs = [], [], [], []
    trainer.g_deblur.register_forward_hook(lambda m, a, o: g_inputs.append(a[0].detach().clone()))
    trainer.blur.register_forward_hook(lambda m, a, o: blur_inputs.append(a[0].detach().clone()))
    trainer.d_sharp.register_forward_hook(lambda m, a, o: d_sharp_inputs.append(a[0].detach().clone()))
    trainer.d_blurred.register_forward_hook(lambda m, a, o: d_blurred_inputs.append(a[0].detach().clone()))
    trainer.run()
    out = trainer.state.output[0]
    torch.testing.assert_close(blur_inputs[0], base["sharp"])  # the sharp cycle: h*x of the cycle's crops
    torch.testing.assert_close(blur_inputs[1], other["sharp_unpaired"])  # h's adversarial view: its own h*x
    torch.testing.assert_close(g_inputs[1], other["blurred_unpaired"])  # G(y) on the unpaired crops
    assert not torch.equal(g_inputs[0], g_inputs[1])
    torch.testing.assert_close(d_sharp_inputs[-2], other["sharp_unpaired"])  # φ's real input in its own step
    torch.testing.assert_close(d_blurred_inputs[-2], other["blurred_unpaired"])  # ψ's real input
    torch.testing.assert_close(out[CycleGANKeys.SHARP], other["sharp_unpaired"][0])
    torch.testing.assert_close(out[CycleGANKeys.BLURRED], other["blurred_unpaired"][0])
    # without the keys: one h*x; with copies of the same crops: the same step as without them
    assert len(blur_inputs) == 3  # h*x, h*x' and h*G(y')
    plain, same = _build("blind", loader=[base]), _build("blind", loader=[{**base, "sharp_unpaired": base["sharp"], "blurred_unpaired": base["blurred"]}])
    calls = []
    plain.blur.register_forward_hook(lambda m, a, o: calls.append(1))
    plain.run()
    same.run()
    assert len(calls) == 2  # without the keys no second h*x is computed
    for a, b in zip(plain.g_deblur.parameters(), same.g_deblur.parameters(), strict=True):
        torch.testing.assert_close(a, b)

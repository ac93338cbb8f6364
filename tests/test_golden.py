"""Golden outputs: inference and one training iteration on fixed seeds, equal before and after refactoring.

``python tests/test_golden.py`` rewrites the files in ``tests/golden/`` (only when behaviour is meant
to change: say why in the commit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bundle.engine import CycleGANTrainer, discriminator_parameters, generator_param_groups
from bundle.image_pool import ImagePool
from bundle.inference import Deconvolver, deconvolve
from bundle.networks import DeblurUNet, MultiScalePatchDiscriminator, PSFLayer

GOLDEN = Path(__file__).parent / "golden"
FEATURES = (4, 4, 8, 8, 16, 4)


def _inference() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    net = DeblurUNet(features=FEATURES).eval()
    volume = torch.rand(24, 40, 56, generator=torch.Generator().manual_seed(1)).numpy()
    auto = deconvolve(volume, net, progress=False, precision="float32", flips=1)  # the stored single-view output
    windows = Deconvolver(net, roi_size=(16, 32, 32), overlap=0.25, precision="float32")
    with torch.no_grad():
        tiled = windows(torch.from_numpy(volume)[None, None])[0, 0].numpy()
    return {"auto": auto, "tiled": tiled}


def _training_iteration() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    g = DeblurUNet(features=FEATURES)
    blur = PSFLayer.build(kernel_size=(7, 7, 7), parameterization="parametric", na=1.1)
    d_sharp = MultiScalePatchDiscriminator(channels=4, num_layers_d=2)
    d_blurred = MultiScalePatchDiscriminator(channels=4, num_layers_d=2)
    gen = torch.Generator().manual_seed(2)
    batch = {"sharp": torch.rand(2, 1, 32, 32, 32, generator=gen), "blurred": torch.rand(2, 1, 32, 32, 32, generator=gen)}
    trainer = CycleGANTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], g_deblur=g, blur=blur, d_sharp=d_sharp, d_blurred=d_blurred,
        g_optimizer=torch.optim.Adam(generator_param_groups(g, blur, lr=1e-3, psf_lr=2e-2, scale_lr=1e-3), betas=(0.5, 0.999)),
        d_optimizer=torch.optim.Adam(discriminator_parameters(d_sharp, d_blurred), lr=1e-3),
        sharp_pool=ImagePool(pool_size=4, seed=0), blurred_pool=ImagePool(pool_size=4, seed=1),
    )  # fmt: skip
    trainer.run()
    probe = torch.rand(1, 1, 16, 32, 32, generator=gen)
    with torch.no_grad():
        return {
            "g_output": g.eval()(probe).numpy(),
            "psf": blur.kernel().detach().numpy(),
            "d_sharp": torch.cat([p.detach().flatten() for p in d_sharp.parameters()]).numpy(),
        }


def test_inference_equals_the_golden_output():
    golden = np.load(GOLDEN / "inference.npz")
    for key, value in _inference().items():
        np.testing.assert_allclose(value, golden[key], rtol=0, atol=1e-6, err_msg=key)


def test_one_training_iteration_equals_the_golden_state():
    golden = np.load(GOLDEN / "training_iteration.npz")
    for key, value in _training_iteration().items():
        np.testing.assert_allclose(value, golden[key], rtol=0, atol=1e-6, err_msg=key)


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN / "inference.npz", **_inference())
    np.savez_compressed(GOLDEN / "training_iteration.npz", **_training_iteration())

"""MLflow tracking that a user can read: every loss term, learning rates, the learned PSF, the model.

Used through ``--tracking configs/tracking/mlflow.json`` (MONAI's tracking settings with this handler
for the trainer).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from bundle.handlers.records import save_orthoslices

logger = logging.getLogger(__name__)

__all__ = ["TrainingMLFlowHandler"]


class TrainingMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` for the cycleGAN trainer, logging what a reader of the run needs.

    Beyond MONAI's handler (total loss per iteration, ``engine.state.metrics`` per epoch, the
    executed config as an artifact):

    - per iteration: every scalar loss term of ``engine.state.output`` (``cycle_sharp``,
      ``cycle_blurred``, ``adv_sharp``, ``adv_blurred``, ``feature_matching``, ``d_sharp``, ``d_blurred``, ``g_loss``,
      ``d_loss``) and the learning rate of every parameter group of each optimizer
      (``lr_<name>_group_<i>``: the trainer has two optimizers and no ``engine.optimizer``);
    - per epoch: the PSF layer's physical parameters (``psf_na``, ``psf_spherical``, ``psf_gain``, ...)
      and the FWHMs of its kernel in µm (``psf_fwhm_z_um``, ...);
    - at the start: ``tags`` (e.g. mode, seed) besides MONAI's run parameters (``experiment_param``);
    - at the end: the PSF's XY/XZ/YZ sections as ``psf.png`` and its kernel as ``psf.pt``, and the
      ``artifacts`` files that exist (e.g. ``model.pt``, ``blur.tif``, ``blur.json``).

    Args:
        blur: the PSF layer (``physical_parameters()``, ``kernel()``, ``voxel_size``); None: no PSF logs.
        optimizers: ``{name: optimizer}`` whose parameter groups' learning rates are logged.
        tags: run tags, values turned into strings.
        kwargs: ``monai.handlers.MLFlowHandler``'s arguments (``tracking_uri``, ``experiment_name``,
            ``experiment_param``, ``artifacts``, ``artifact_location``, ...).
    """

    def __init__(
        self,
        blur: torch.nn.Module | None = None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        tags: Mapping[str, Any] | None = None,
        artifacts: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        files = [artifacts] if isinstance(artifacts, str) else list(artifacts or [])
        super().__init__(artifacts=files, **kwargs)
        self.blur = blur
        self.optimizers = dict(optimizers or {})
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}

    def start(self, engine: Engine) -> None:
        super().start(engine)
        if self.cur_run is not None:
            for key, value in self.tags.items():
                self.client.set_tag(self.cur_run.info.run_id, key, value)

    def _default_iteration_log(self, engine: Engine) -> None:
        super()._default_iteration_log(engine)
        output = engine.state.output
        first = output[0] if isinstance(output, (list, tuple)) and output else output
        terms = {}
        if isinstance(first, Mapping):
            for key, value in first.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    terms[str(key)] = float(value.detach())
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    terms[str(key)] = float(value)
        for name, optimizer in self.optimizers.items():
            for i, group in enumerate(optimizer.param_groups):
                terms[f"lr_{name}_group_{i}"] = float(group["lr"])
        if terms:
            self._log_metrics(terms, step=engine.state.iteration)

    def _default_epoch_log(self, engine: Engine) -> None:
        super()._default_epoch_log(engine)
        if self.blur is None or self.cur_run is None:
            return
        values: dict[str, float] = {}
        if hasattr(self.blur, "physical_parameters"):
            values.update({f"psf_{k}": float(v) for k, v in self.blur.physical_parameters().items()})
        if hasattr(self.blur, "kernel"):
            from bundle.physics.psf import fwhm

            with torch.no_grad():
                kernel = self.blur.kernel().detach().float().cpu().numpy()
            voxel = tuple(getattr(self.blur, "voxel_size", None) or (1.0, 1.0, 1.0))
            for axis, name in enumerate("zyx"):
                width = fwhm(kernel, axis=axis, voxel_size=voxel[axis])
                if width == width:  # not NaN
                    values[f"psf_fwhm_{name}_um"] = float(width)
        if values:
            self._log_metrics(values, step=self.global_epoch_transform(engine.state.epoch))

    def complete(self) -> None:
        if self.cur_run is not None and self.blur is not None and hasattr(self.blur, "kernel"):
            with torch.no_grad():
                kernel = self.blur.kernel().detach().float().cpu()
            voxel = tuple(getattr(self.blur, "voxel_size", None) or (1.0, 1.0, 1.0))
            with tempfile.TemporaryDirectory() as tmp:
                save_orthoslices(kernel.numpy(), Path(tmp) / "psf.png", voxel_size=voxel, title="PSF (h)")
                torch.save(kernel, Path(tmp) / "psf.pt")
                for name in ("psf.png", "psf.pt"):
                    self.client.log_artifact(self.cur_run.info.run_id, str(Path(tmp) / name))
        self.artifacts = [a for a in self.artifacts if a and Path(a).exists()]
        super().complete()

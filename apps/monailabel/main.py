"""MONAI Label app serving a trained deconvolution bundle (3D widefield stack -> deconvolved stack).

Start it (in the MONAI Label virtualenv made by ``scripts/monailabel_check.py``; MONAI Label pulls
torchvision, which must stay out of the bundle's own environment)::

    monailabel start_server --app apps/monailabel --studies my/stacks \\
        --conf bundle path/to/exported_bundle --host 127.0.0.1 --port 8000

and post a stack: ``curl -F "file=@stack.tif" "http://127.0.0.1:8000/infer/deconvolution?output=image"``
returns the deconvolved stack as a float32 ImageJ TIFF with the input's voxel size.

The infer task runs the bundle's own pipeline, so the result equals
:func:`bundle.inference.deconvolve` on the same stack: the bundle's loader (axes stay Z, Y, X for
every format, voxel size kept), its percentile normalisation (``blurred_percentiles`` of the
exported ``configs/inference.json``), its ``inferer`` (windows planned per volume, mirror padding,
halo) and the inverse normalisation back to the input's intensities. The output is an *image*, not a
label map (task type ``others``): nothing is written into the studies folder (the datastore is
read-only) and the float writer never rounds to integers.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import Inferer
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from bundle.inference import NormalizePercentilesd, RestoreIntensityd, TiledInferer, load_network
from bundle.io import LoadVolumed, save_volume

logger = logging.getLogger(__name__)

STACK_EXTENSIONS = ["*.tif", "*.tiff", "*.nii", "*.nii.gz", "*.mha", "*.mhd", "*.nrrd"]


def _inference_settings(bundle_dir: Path) -> tuple[tuple[float, float], TiledInferer]:
    """The exported bundle's ``blurred_percentiles`` and ``inferer`` (from its ``configs/inference.json``)."""
    config = bundle_dir / "configs" / "inference.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: not found; --conf bundle must name an exported bundle folder")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    parser["progress"] = False
    percentiles = tuple(float(p) for p in parser.get_parsed_content("blurred_percentiles"))
    inferer = parser.get_parsed_content("inferer")
    return (percentiles[0], percentiles[1]), inferer


class DeconvolutionTask(BasicInferTask):
    """Infer task of type ``others``: the bundle's deconvolution pipeline on one stack.

    Args:
        bundle_dir: exported bundle folder (``configs/inference.json``, ``models/model.pt``).
    """

    def __init__(self, bundle_dir: str) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.percentiles, self._inferer = _inference_settings(self.bundle_dir)
        super().__init__(
            path=None,
            network=None,
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="Deconvolve a 3D widefield stack (cycleGAN with a blur kernel); float32 output",
            config={"device": "cuda" if torch.cuda.is_available() else "cpu"},
        )
        self._loaded: dict[str, torch.nn.Module] = {}

    def is_valid(self) -> bool:
        return (self.bundle_dir / "configs" / "inference.json").is_file()

    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        return [
            LoadVolumed(keys="image"),
            NormalizePercentilesd(keys="image", percentiles=self.percentiles),
        ]

    def inferer(self, data: Any = None) -> Inferer:
        return self._inferer

    def inverse_transforms(self, data: Any = None) -> Sequence[Callable]:
        return []

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        return [RestoreIntensityd(keys="pred", range_key="image_range", output_range="input")]

    def _get_network(self, device: str, data: Any) -> torch.nn.Module:
        """The bundle's generator, loaded once per device (the bundle's own loader and checks)."""
        if device not in self._loaded:
            self._loaded[device] = load_network(self.bundle_dir, torch.device(device)).eval()
        return self._loaded[device]

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """Float32 ImageJ TIFF with the input's voxel size, in a temporary file the server sends and removes."""
        pred = data["pred"]
        volume = (pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred))[0]
        meta = getattr(data.get("image"), "meta", {})  # the bundle loader's MetaTensor (NaN: voxel size unknown)
        voxel = [float(v) for v in torch.as_tensor(meta.get("voxel_size", [float("nan")] * 3)).reshape(-1)]
        voxel_size = None if any(not np.isfinite(v) for v in voxel) else voxel
        fd, name = tempfile.mkstemp(suffix=".tif", prefix="deconvolved_")
        os.close(fd)
        os.remove(name)  # save_volume writes atomically and refuses nothing at a fresh path
        save_volume(name, volume.astype(np.float32), voxel_size=voxel_size, dtype=np.float32)
        return name, {"shape": list(volume.shape), "voxel_size_um": voxel_size}


class DeconvolutionApp(MONAILabelApp):
    """MONAI Label app with one infer task, ``deconvolution`` (conf ``bundle``: the exported bundle folder)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        bundle_dir = conf.get("bundle")
        if not bundle_dir:
            raise ValueError("start the server with --conf bundle <exported bundle folder>")
        self.bundle_dir = Path(bundle_dir).expanduser().resolve()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="deconvolution",
            description="Unsupervised 3D deconvolution microscopy (cycleGAN with a blur kernel)",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        # read-only: the server never writes next to the user's stacks
        return LocalDatastore(self.studies, extensions=STACK_EXTENSIONS, auto_reload=False, read_only=True)

    def init_infers(self) -> dict[str, InferTask]:
        return {"deconvolution": DeconvolutionTask(str(self.bundle_dir))}

    def init_trainers(self) -> dict:
        return {}

    def init_strategies(self) -> dict:
        return {}

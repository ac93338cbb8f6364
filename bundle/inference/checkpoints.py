"""Checkpoints and models: state dicts read safely, networks rebuilt from them, bundle folders and
TorchScript files loaded (:func:`load_network`), MONAI's ``CheckpointLoader`` with the same checks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import PathLike
from monai.handlers import CheckpointLoader as _MonaiCheckpointLoader
from torch import nn

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# loading a model
# ----------------------------------------------------------------------------------------------------------


def network_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A ``DeblurUNet`` whose sizes (channels, the six ``features``) are read from a state dict; an
    ``RLGuidedUNet`` (with its PSF and RL iterations) when the state dict holds ``guide_psf``.

    Raises:
        KeyError: the state dict is not a ``DeblurUNet``'s.
    """
    from bundle.networks import DeblurUNet, RLGuidedUNet

    args = generator_arguments(state_dict)
    if "guide_psf" in state_dict:
        args.pop("in_channels")
        return RLGuidedUNet(psf=state_dict["guide_psf"], rl_iterations=int(state_dict["guide_iterations"]), **args)
    return DeblurUNet(**args)


def generator_arguments(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``DeblurUNet`` keyword arguments that a state dict reveals: channels, ``features``,
    ``depth``, ``align_corners``, ``norm``, ``voxel_size`` and ``input_range`` (plain Python values).

    Raises:
        KeyError: the state dict is not a ``DeblurUNet``'s.
    """
    from bundle.networks import DeblurUNet

    def out_ch(key: str) -> int:
        return int(state_dict[f"unet.{key}.conv.weight"].shape[0])

    first = state_dict["unet.conv_0.conv_0.conv.weight"]
    depth = 0
    while f"unet.down_{depth + 1}.convs.conv_0.conv.weight" in state_dict:
        depth += 1
    features = [out_ch("conv_0.conv_0")] + [out_ch(f"down_{i}.convs.conv_0") for i in range(1, depth + 1)]
    features.append(out_ch("upcat_1.convs.conv_0"))
    if "settings" in state_dict:
        settings = DeblurUNet.describe(state_dict["settings"])
    else:  # written before the settings were stored: BasicUNet's upsampling; the norm shows in the keys
        norm = "batch" if "unet.conv_0.conv_0.adn.N.running_mean" in state_dict else "instance"
        if "unet.conv_0.conv_0.adn.N.weight" not in state_dict:
            norm = "none"
        settings = {"depth": depth, "align_corners": True, "norm": norm}
    voxel = state_dict.get("voxel_size")
    input_range = state_dict.get("input_range")
    return {
        "in_channels": int(first.shape[1]),
        "out_channels": int(state_dict["unet.final_conv.weight"].shape[0]),
        "features": features,
        "voxel_size": None if voxel is None or not torch.isfinite(voxel).all() else [float(v) for v in voxel],
        "input_range": None
        if input_range is None or not torch.isfinite(input_range).all()
        else [float(v) for v in input_range],
        **settings,
    }


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = "train a model first, or pass --ckpt_path"
        if not path.is_absolute():  # configs put it under bundle_root, "." by default: the current folder
            hint = (
                f"looked for {path.resolve()}; run from the bundle's folder or pass --bundle_root <bundle folder>, "
                "or pass --ckpt_path (or train a model first)"
            )
        raise FileNotFoundError(f"{path}: checkpoint not found ({hint})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # {"model": state_dict}, as MONAI's CheckpointSaver writes
    if isinstance(state, Mapping) and "g_deblur" in state and isinstance(state["g_deblur"], Mapping):
        state = state["g_deblur"]  # a training checkpoint (ResumableCheckpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    return dict(state)


def load_checkpoint(network: nn.Module, path: PathLike) -> nn.Module:
    """Load ``model.pt`` (a state dict, ``{"model": ...}`` or a training checkpoint) into ``network``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when it is unreadable or does not match the network (e.g. trained
            with other ``generator_features``: pass the same config overrides as for training).
    """
    path = Path(path)
    state = _read_state_dict(path)
    if "guide_psf" in state and "guide_psf" not in network.state_dict():
        from bundle.networks.rl_guided import NOT_EXPORTABLE

        raise ValueError(f"{path}: {NOT_EXPORTABLE} (or load it with bundle.inference.load_network)")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()
        raise ValueError(
            f"{path}: checkpoint does not match the network ({'; '.join(detail[:4])[:600]}). Use the configs "
            "the model was trained with (e.g. add configs/quick.json for a quick model)"
        ) from exc
    return network


def network_for_checkpoint(network: nn.Module, ckpt_path: PathLike | None) -> nn.Module:
    """The config's ``network`` with the checkpoint's weights, or one built from the checkpoint.

    The command line builds ``network_def`` from the configs, and a model trained with other sizes
    (e.g. ``configs/quick.json``) or settings would not fit it; the checkpoint holds them (its
    shapes, and the ``settings`` / ``voxel_size`` buffers), so a ``DeblurUNet`` that does not match
    is rebuilt from the checkpoint (logged), as the Python API does (:func:`load_network`). Other
    networks (e.g. Richardson–Lucy, ``ckpt_path`` None) are returned unchanged; a checkpoint that is
    missing or of another kind is left to :class:`CheckpointLoader`, which names the file.
    """
    from bundle.networks import DeblurUNet

    if ckpt_path is None or not isinstance(network, DeblurUNet) or not Path(ckpt_path).is_file():
        return network
    state = _read_state_dict(Path(ckpt_path))
    try:
        network.load_state_dict(state, strict=True)
        return network
    except RuntimeError:
        pass
    try:
        rebuilt = network_from_state_dict(state)
        rebuilt.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError):
        return network  # not a DeblurUNet's: CheckpointLoader reports the mismatch, naming the file
    device = next(network.parameters()).device
    logger.info(
        f"{ckpt_path}: network sizes and settings read from the checkpoint "
        f"({sum(p.numel() for p in rebuilt.parameters())} parameters, {DeblurUNet.describe(rebuilt.settings)}), "
        "not from the configs"
    )
    return rebuilt.to(device)


class CheckpointLoader(_MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose errors name the checkpoint file (and say what to do).

    Args: as ``monai.handlers.CheckpointLoader`` (``load_path``, ``load_dict``, ...). With a single
    network in ``load_dict`` the file may be a bare state dict, ``{"model": ...}`` or a training
    checkpoint; the loading is :func:`load_checkpoint`.
    """

    def __call__(self, engine: Any) -> None:
        if len(self.load_dict) == 1:
            load_checkpoint(next(iter(self.load_dict.values())), self.load_path)
            logger.info(f"restored {self.load_path}")
            return
        try:
            super().__call__(engine)
        except Exception as exc:
            raise ValueError(f"{self.load_path}: cannot load checkpoint ({exc})") from exc


def model_file_in(folder: Path) -> Path | None:
    """The model file :func:`load_network` takes from a folder: ``models/model.pt``, ``model.pt`` or
    ``models/model.ts`` (the first that exists), or None."""
    for candidate in (folder / "models" / "model.pt", folder / "model.pt", folder / "models" / "model.ts"):
        if candidate.is_file():
            return candidate
    return None


def load_network(model: nn.Module | PathLike, device: torch.device | str | None = None) -> nn.Module:
    """The generator, in eval mode on ``device``, from a module, a checkpoint or a trained bundle.

    Args:
        model: an ``nn.Module``; a state-dict file (``model.pt``); a TorchScript file (``.ts``); a bundle
            zip written by ``scripts/export_bundle.py``; or a
            folder: a bundle root (``models/model.pt``, network from its ``configs/common.json``
            ``network_def`` when that matches) or a checkpoint folder (``model.pt``). Without a
            matching config the ``DeblurUNet`` sizes are read from the state dict.
        device: target device; None keeps a module's device and puts files on the CPU.
    """
    if isinstance(model, nn.Module):
        net = model
    elif Path(model).suffix.lower() == ".zip":
        net = _load_zipped_bundle(Path(model))
    else:
        path = Path(model)
        if path.is_dir():
            bundle_root = path
            found = model_file_in(path)
            if found is None:
                raise FileNotFoundError(
                    f"{model}: no models/model.pt, model.pt or models/model.ts in this folder"
                )
            path = found
        else:
            bundle_root = None
        if path.suffix == ".ts":
            try:
                net = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise ValueError(f"{path}: cannot load TorchScript model ({exc})") from exc
        else:
            state = _read_state_dict(path)
            net = None
            config = None if bundle_root is None else bundle_root / "configs" / "common.json"
            if config is not None and config.is_file():
                from monai.bundle import ConfigParser

                parser = ConfigParser()
                parser.read_config(str(config))
                parser["bundle_root"] = str(bundle_root)
                candidate_net = parser.get_parsed_content("network_def", instantiate=True)
                if _matches(candidate_net, state):
                    net = candidate_net
            if net is None:
                try:
                    net = network_from_state_dict(state)
                except KeyError as exc:
                    raise ValueError(f"{path}: not a DeblurUNet checkpoint (missing {exc})") from exc
            load_checkpoint(net, path)
    if device is not None:
        net = net.to(device)
    return net.eval()


def _load_zipped_bundle(path: Path) -> nn.Module:
    """The generator of a bundle zip written by ``scripts/export_bundle.py`` (``<name>/models/model.pt``
    with ``<name>/configs/common.json``), read without unpacking the zip anywhere but a temporary folder."""
    import tempfile
    import zipfile

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            models = [n for n in names if n.endswith("models/model.pt") and n.count("/") <= 2]
            if not models:
                raise ValueError(f"{path}: not an exported bundle (no <name>/models/model.pt inside)")
            root = models[0][: -len("models/model.pt")]
            wanted = [n for n in names if n == models[0] or n == f"{root}configs/common.json"]
            with tempfile.TemporaryDirectory() as tmp:
                zf.extractall(tmp, members=wanted)
                return load_network(Path(tmp) / root if root else Path(tmp))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable zip ({exc})") from exc


def _matches(net: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    own = net.state_dict()
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)

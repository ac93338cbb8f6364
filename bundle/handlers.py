"""Ignite handlers of the bundle: progress bar, resumable checkpoints, best model, PSF snapshots, history.

Each handler has ``attach(engine)`` so MONAI workflows register it from a config's handler list.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers import ProgressBar as _IgniteProgressBar

from bundle.allocator import check_malloc_policy, malloc_policy
from bundle.io import atomic_write, atomic_write_text

__all__ = [
    "ProgressBar",
    "every_n_iterations",
    "ResumableCheckpoint",
    "BestModelSaver",
    "ModelWithoutValidation",
    "PSFSnapshot",
    "ValidationHistory",
    "BlurCalibration",
    "MallocPolicy",
    "AttachHandler",
    "atomic_torch_save",
    "load_training_checkpoint",
    "save_orthoslices",
]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename: never a partial file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)``: tensors and plain data only.

    A full unpickle would run whatever code a crafted ``.pt`` names (``--resume_path``, or a file
    dropped into ``<ckpt_dir>/checkpoints/`` and picked up by ``--resume true``). Everything
    :class:`ResumableCheckpoint` saves — ignite's trainer state, state dicts of networks and optimizers,
    the image pools (tensors and a generator state) — is plain data, so no global needs allowing.

    Raises:
        RuntimeError: naming the file, when it is unreadable or holds anything but plain data.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # torch's advice to allow it: not shown
        first = f"it names the global {found.group(1)!r}" if found else type(e).__name__
        raise RuntimeError(
            f"{path}: refused to resume from this checkpoint: it holds objects other than tensors and plain "
            f"data, which would run code when loaded ({first}). Resume only from checkpoints this bundle wrote"
        ) from e
    except Exception as e:  # truncated or not a torch file
        raise RuntimeError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: not a training checkpoint (a {type(state).__name__}, expected a dict)")
    return state


def _atomic_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def every_n_iterations(n: int) -> Callable[[Any, int], bool]:
    """Event filter for ``StatsHandler(iteration_log=...)``: log iterations 1, n+1, 2n+1, ...

    The progress bar already shows every iteration's losses; a log line per iteration repeated them
    (400 lines for the quick demo). ``n <= 0`` logs none.
    """
    n = int(n)

    def log(_engine: Any, event: int) -> bool:
        return n > 0 and (event - 1) % n == 0

    return log


class ProgressBar:
    """tqdm progress bar over an engine's iterations (ignite's ``ProgressBar``), showing output keys.

    Args:
        output_keys: keys of ``engine.state.output`` shown beside the bar (e.g. ``["loss"]``).
        persist: keep the bar after each epoch.
    """

    def __init__(self, output_keys: Sequence[str] = ("loss",), persist: bool = False) -> None:
        self.output_keys = list(output_keys)
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        keys = self.output_keys

        def transform(output: Any) -> dict[str, float]:
            if isinstance(output, list) and output:  # decollated: losses are repeated per sample
                output = output[0]
            if not isinstance(output, dict):
                return {}
            return {k: float(output[k]) for k in keys if k in output}

        _IgniteProgressBar(persist=self.persist).attach(engine, output_transform=transform)


def _numpy_state(rng: np.random.RandomState | None = None) -> dict[str, Any]:
    """A RandomState's state as plain data and a tensor (``torch.load(weights_only=True)`` reads it)."""
    name, keys, pos, has_gauss, gauss = (rng.get_state() if rng is not None else np.random.get_state())  # type: ignore[misc]
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _numpy_set_state(state: dict[str, Any], rng: np.random.RandomState | None = None) -> None:
    value = (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])
    (rng.set_state if rng is not None else np.random.set_state)(value)


def transform_random_states(root: Any) -> list[np.random.RandomState]:
    """Every ``numpy.random.RandomState`` of the MONAI / bundle objects reachable from ``root``.

    MONAI's random transforms each draw from their own ``RandomState`` (``self.R``, also inside
    wrapped array transforms), which no global seed or state covers; a dataset's transforms are
    reached through its attributes (``transform``, ``transforms``, ...; data and caches skipped), in
    a fixed (sorted) order so the states of a resumed run line up with the saved ones.
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 12:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif type(obj).__module__.split(".")[0] in ("monai", "bundle") and hasattr(obj, "__dict__"):
            for name in sorted(vars(obj)):
                if name not in ("data", "_cache", "_hash_keys", "meta"):
                    visit(getattr(obj, name), depth + 1)

    visit(root, 0)
    return found


class RandomStates:
    """Every random generator a training run draws from, as one checkpointable object.

    ``state_dict()`` holds Python's ``random``, NumPy's global and torch's CPU (and CUDA) generators
    and the private ``RandomState`` of every random transform of ``dataset`` (crops, flips,
    rotations: :func:`transform_random_states`). Saved with the checkpoints (``save_dict`` of
    :class:`ResumableCheckpoint`), it makes a killed and resumed run draw the same crops as an
    uninterrupted one. The image pools and discriminator draws use their own / torch's generators.

    Args:
        dataset: the training dataset (its transforms' generators are included); None for none.
    """

    def __init__(self, dataset: Any = None) -> None:
        self.dataset = dataset

    def state_dict(self) -> dict[str, Any]:
        state = random.getstate()
        out: dict[str, Any] = {
            "python": {"version": state[0], "internal": list(state[1]), "gauss": state[2]},
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state(r) for r in transform_random_states(self.dataset)],
        }
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
        _numpy_set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        generators = transform_random_states(self.dataset)
        if len(generators) != len(state["transforms"]):
            raise ValueError(
                f"the checkpoint has {len(state['transforms'])} transform generators, this dataset "
                f"{len(generators)}: resume with the configuration of the interrupted run"
            )
        for rng, saved in zip(generators, state["transforms"], strict=True):
            _numpy_set_state(saved, rng)


class ResumableCheckpoint:
    """Save everything needed to resume training, atomically, and resume from the latest save.

    Wraps ignite's ``Checkpoint`` with an atomic ``DiskSaver``. On ``Events.STARTED`` with
    ``resume=True`` it loads the newest ``checkpoint_<iteration>.pt`` in ``save_dir`` (if any) into
    every object of ``save_dict`` — trainer state, networks, optimizers, image pools — keeping the
    configured ``max_epochs`` so a run can also be extended.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: ``{name: object with state_dict/load_state_dict}`` (networks, optimizers); the
            engine itself is added as ``"trainer"`` at attach time (a config cannot refer to the
            trainer from inside its own handler list), ``None`` entries are dropped.
        engine_objects: attributes of the engine saved too when present (the image pools).
        save_interval: save every this many epochs (and at the end of training).
        n_saved: how many recent checkpoints to keep.
        resume: load the newest checkpoint at start.
        load_path: an explicit checkpoint file to resume from (implies ``resume``).
        overwrite: for a fresh run (not resuming) whose ``save_dir`` holds checkpoints of an earlier
            run: delete them (True) or refuse to start (False, the default). Kept, they would make a
            later ``--resume true`` continue the earlier run instead of this one.
    """

    PREFIX = "checkpoint"

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        engine_objects: Sequence[str] = ("sharp_pool", "blurred_pool"),
        save_interval: int = 1,
        n_saved: int = 2,
        resume: bool = False,
        load_path: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.overwrite = bool(overwrite)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.engine_objects = tuple(engine_objects)
        self.save_interval = max(1, int(save_interval))
        self.n_saved = n_saved
        self.resume = bool(resume) or load_path is not None
        self.load_path = load_path

    def latest(self) -> Path | None:
        """The newest checkpoint file in ``save_dir`` (highest iteration), or ``None``."""
        if not self.save_dir.is_dir():
            return None
        found = []
        for f in self.save_dir.glob(f"{self.PREFIX}_*.pt"):
            m = re.search(r"_(\d+)\.pt$", f.name)
            if m:
                found.append((int(m.group(1)), f))
        return max(found)[1] if found else None

    def _earlier_checkpoints(self) -> list[Path]:
        if not self.save_dir.is_dir():
            return []
        return sorted(f for f in self.save_dir.glob(f"{self.PREFIX}_*.pt") if re.search(r"_(\d+)\.pt$", f.name))

    def _start_fresh(self) -> None:
        """A fresh run: refuse, or with ``overwrite`` delete, the checkpoints of an earlier run."""
        earlier = self._earlier_checkpoints()
        if not earlier:
            return
        if not self.overwrite:
            raise FileExistsError(
                f"{self.save_dir}: holds checkpoints of an earlier training run (newest: {self.latest().name}). "
                "Continue that run with --resume true, train into another --ckpt_dir, or start over with "
                "--overwrite true (deletes them and replaces the earlier model)"
            )
        for f in earlier:
            f.unlink()
        logger.warning(f"--overwrite: deleted {len(earlier)} checkpoint(s) of an earlier run from {self.save_dir}")

    def attach(self, engine: Engine) -> None:
        """At ``STARTED`` (when every handler is attached and the trainer is complete): add the trainer
        and its pools, load the checkpoint to resume from, and register the saving last, so that a
        save follows the epoch's validation (a run killed during a validation re-runs it)."""
        if not self.resume:
            self._start_fresh()
        engine.add_event_handler(Events.STARTED, self._setup)

    def _setup(self, engine: Engine) -> None:
        if getattr(self, "_attached_to", None) is engine:
            return  # a second run() of the same engine
        self._attached_to = engine
        self.save_dict["trainer"] = engine
        for name in self.engine_objects:  # created in the trainer's constructor after its handlers attach
            if getattr(engine, name, None) is not None:
                self.save_dict[name] = getattr(engine, name)
        saver = DiskSaver(str(self.save_dir), atomic=True, require_empty=False, create_dir=True)
        checkpoint = Checkpoint(
            self.save_dict,
            saver,
            filename_prefix="",
            filename_pattern=self.PREFIX + "_{global_step}.pt",
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
        )
        every = Events.EPOCH_COMPLETED(every=self.save_interval)
        engine.add_event_handler(every | Events.COMPLETED, self._save_once, checkpoint)
        if self.resume:
            self.load(engine)
            # the files of the interrupted run count towards n_saved: the next saves prune them
            done = engine.state.iteration
            kept = sorted(
                (int(m.group(1)), f.name)
                for f in self._earlier_checkpoints()
                if (m := re.search(r"_(\d+)\.pt$", f.name)) and int(m.group(1)) <= done
            )
            checkpoint.load_state_dict({"_saved": [list(item) for item in kept]})

    @staticmethod
    def _save_once(engine: Engine, checkpoint: Checkpoint) -> None:
        if getattr(engine.state, "_last_ckpt_iteration", None) == engine.state.iteration:
            return  # EPOCH_COMPLETED and COMPLETED of the last epoch: one file
        checkpoint(engine)
        engine.state._last_ckpt_iteration = engine.state.iteration

    def load(self, engine: Engine) -> None:
        """Load ``load_path`` or the newest checkpoint into ``save_dict``; no-op when there is none."""
        path = Path(self.load_path) if self.load_path else self.latest()
        if path is None:
            logger.info(f"no checkpoint in {self.save_dir}: starting from scratch")
            return
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint to resume from does not exist")
        state = load_training_checkpoint(path)
        try:
            max_epochs = engine.state.max_epochs
            Checkpoint.load_objects(to_load=self.save_dict, checkpoint=state)
        except Exception as e:  # a checkpoint of another network
            raise RuntimeError(f"{path}: cannot resume from this checkpoint: {e}") from e
        if max_epochs is not None:
            if engine.state.epoch > max_epochs:
                raise ValueError(f"{path}: checkpoint is at epoch {engine.state.epoch} > max_epochs {max_epochs}")
            engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {path} at iteration {engine.state.iteration}")


class BestModelSaver:
    """After each validation, save the generator (and companions) when the key metric improves.

    Writes ``save_dir/model.pt`` (the ``network``'s state dict: the model-zoo convention), the
    companions' state dicts as ``<name>.pt``, calls ``export(save_dir/<name>.tif)`` on companions that
    have it (the PSF layer), and records the score in ``save_dir/model.json``; all writes atomic.

    A resumed run (``resume=True``) reads the best score back from ``model.json``, so it keeps its best
    model. A fresh run starts a fresh record: it never compares itself with an earlier run's score
    (which would silently keep that run's model). If ``save_dir`` already holds an earlier model, a
    fresh run refuses to start unless ``overwrite`` (then the earlier model is replaced at the first
    validation, and a warning says so).

    Args:
        save_dir: output folder (usually ``ckpt_dir``).
        network: the network saved as ``model.pt`` (``g_deblur``).
        metric_name: metric in ``engine.state.metrics`` to maximise (default: the key metric).
        companions: other modules to save with it, e.g. ``{"blur": blur}``.
        filename: name of the network's file.
        resume: this run continues an earlier one (keep its record).
        overwrite: a fresh run may replace an earlier model found in ``save_dir``.
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        metric_name: str | None = None,
        companions: dict[str, torch.nn.Module] | None = None,
        filename: str = "model.pt",
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        self.save_dir = Path(save_dir)
        self.network = network
        self.metric_name = metric_name
        self.companions = {k: v for k, v in (companions or {}).items() if v is not None}
        self.filename = filename
        self.best: float | None = None
        self.written = False

    @property
    def record_path(self) -> Path:
        return self.save_dir / (Path(self.filename).stem + ".json")

    def attach(self, engine: Engine) -> None:
        earlier = [p for p in (self.save_dir / self.filename, self.record_path) if p.is_file()]
        if self.resume:
            if self.record_path.is_file():
                self.best = json.loads(self.record_path.read_text()).get("score")
        elif earlier and not self.overwrite:
            raise FileExistsError(
                f"{earlier[0]}: a model of an earlier training run is in {self.save_dir}. Continue that run with "
                "--resume true, train into another --ckpt_dir, or replace it with --overwrite true"
            )
        elif earlier:
            logger.warning(f"--overwrite: this fresh run replaces the earlier model in {self.save_dir} at its first validation")
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or engine.state.key_metric_name
        score = engine.state.metrics.get(name)
        if score is None:
            raise KeyError(f"metric {name!r} not in the evaluator's metrics {sorted(engine.state.metrics)}")
        score = float(score)
        if self.best is not None and not score > self.best:
            return
        self.best = score
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, torch.Tensor))}
        # a validator run by ValidationHandler carries the trainer's epoch
        self.write({"metric": name, "score": score, "epoch": engine.state.epoch, "metrics": metrics})
        logger.info(f"best {name} {score:.4f}: saved {self.save_dir / self.filename}")

    def write(self, record: dict[str, Any]) -> None:
        """Write the network, its companions and ``record`` (the ``model.json``), each atomically."""
        atomic_torch_save(self.network.state_dict(), self.save_dir / self.filename)
        for key, module in self.companions.items():
            atomic_torch_save(module.state_dict(), self.save_dir / f"{key}.pt")
            if hasattr(module, "export"):
                module.export(str(self.save_dir / f"{key}.tif"), str(self.save_dir / f"{key}.json"))
        _atomic_json(record, self.record_path)
        self.written = True


class ModelWithoutValidation:
    """Training without validation data: say so at the start, write the last model at the end.

    Validation folders are optional (:func:`bundle.data.validation_datalist` gives an empty list when
    there are none, and MONAI's evaluator then skips its runs), so :class:`BestModelSaver` is never
    called. A model is never silently kept or silently missing: this handler logs a warning when
    training starts and, when training completes with nothing saved, writes the current weights
    (the EMA generator of the saver) with a record that says why.

    Args:
        saver: the validation's :class:`BestModelSaver` (``@validate#handlers#1``).
        validator: the evaluator (its data loader is checked for data).
    """

    def __init__(self, saver: BestModelSaver, validator: Engine) -> None:
        self.saver = saver
        self.validator = validator

    def _no_data(self) -> bool:
        loader = getattr(self.validator, "data_loader", None)
        try:
            return loader is None or len(loader) == 0
        except TypeError:  # an iterable without a length: assume it has data
            return False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        if self._no_data():
            logger.warning(
                "no validation data: validation, best-model selection and the collapse guard are off; the model "
                f"written to {self.saver.save_dir / self.saver.filename} at the end is the last one"
            )

    def completed(self, engine: Engine) -> None:
        if self._no_data() and not getattr(self.saver, "written", False):
            record = {"metric": None, "score": None, "epoch": engine.state.epoch, "metrics": {},
                      "note": "no validation data: the weights at the end of training"}  # fmt: skip
            self.saver.write(record)
            logger.warning(f"no validation data: saved the last model to {self.saver.save_dir / self.saver.filename}")


class PSFSnapshot:
    """After each validation, export the current PSF (TIFF + JSON) and a PNG of its central slices.

    Args:
        blur: the PSF layer (has ``kernel()`` and ``export()``).
        output_dir: folder; files ``psf_latest.tif``, ``psf_latest.json``, ``psf_latest.png``.
        voxel_size: ``(z, y, x)`` µm for the PNG's aspect ratio (default: the layer's).
    """

    def __init__(self, blur: torch.nn.Module, output_dir: str, voxel_size: Sequence[float] | None = None) -> None:
        self.blur = blur
        self.output_dir = Path(output_dir)
        self.voxel_size = voxel_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not hasattr(self.blur, "kernel"):
            return  # the conventional cycleGAN's blur generator is a network, not a PSF
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.blur.export(str(self.output_dir / "psf_latest.tif"), str(self.output_dir / "psf_latest.json"))
        with torch.no_grad():
            kernel = self.blur.kernel().detach().float().cpu().numpy()
        voxel = self.voxel_size or getattr(self.blur, "voxel_size", (1.0, 1.0, 1.0))
        save_orthoslices(kernel, self.output_dir / "psf_latest.png", voxel_size=voxel, title="learned PSF")


def save_orthoslices(
    volume,
    path: str | os.PathLike,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | Sequence[str] = "",
) -> Path:
    """PNG of the XY, XZ and YZ central slices of ``(Z, Y, X)`` volumes, written atomically.

    Args:
        volume: one ``(Z, Y, X)`` array, or a sequence of them (one row each, e.g. input / output /
            ground truth, the paper's figure style); slices through each volume's centre.
        path: output PNG (900 pixels wide, 320 high per row).
        voxel_size: ``(z, y, x)`` for the aspect ratio.
        title: one title, or one per volume.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no process-wide backend switch

    path = Path(path)
    volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    titles = [title] * len(volumes) if isinstance(title, str) else list(title)
    vz, vy, vx = voxel_size
    fig = Figure(figsize=(9, 3.2 * len(volumes)))
    axes = fig.subplots(len(volumes), 3, squeeze=False)
    for row, vol, name in zip(axes, volumes, titles):
        z, y, x = (s // 2 for s in vol.shape)
        views = [
            (vol[z], vy / vx, "XY"),
            (vol[:, y, :], vz / vx, "XZ"),
            (vol[:, :, x], vz / vy, "YZ"),
        ]
        for ax, (img, aspect, view) in zip(row, views):
            ax.imshow(img, cmap="magma", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name} {view}".strip())
            ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    return path


class ValidationHistory:
    """Append every validation's metrics (with the trainer's epoch) to a JSON list, atomically.

    Args:
        path: output JSON file, e.g. ``<output_dir>/validation.json``.
        blur: optional PSF layer whose ``physical_parameters()`` are recorded too.
        epoch_length: iterations per trainer epoch, to record the iteration as well.
        resume: this run continues an earlier one: keep the earlier entries up to the epoch validated
            now (a validation cut off by a kill is replaced by its re-run). A fresh run starts a fresh
            file at its first validation.
    """

    def __init__(
        self, path: str, blur: torch.nn.Module | None = None, epoch_length: int | None = None, resume: bool = False
    ) -> None:
        self.path = Path(path)
        self.blur = blur
        self.epoch_length = epoch_length
        self._keep_earlier = bool(resume)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # a validator run by ValidationHandler carries the trainer's epoch
        history = json.loads(self.path.read_text()) if self._keep_earlier and self.path.is_file() else []
        history = [e for e in history if e.get("epoch", 0) < epoch]
        self._keep_earlier = True  # from now on this run's own entries
        entry: dict[str, Any] = {
            "epoch": epoch,
            "iteration": epoch * self.epoch_length if self.epoch_length else None,
        }
        entry.update({k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, torch.Tensor))})
        if self.blur is not None and hasattr(self.blur, "physical_parameters"):
            entry["psf"] = self.blur.physical_parameters()
        history.append(entry)
        _atomic_json(history, self.path)


class BlurCalibration:
    """Before the first iteration, set the blur path's gain and offset from the data.

    Percentile-normalised blurred volumes do not obey ``y = h * x`` with a unit-sum PSF and a sharp
    domain in [0, 1] (blurring a thin filament lowers its peak ~20×); without this calibration the
    generator collapses to a near-zero output (DESIGN.md findings). Draws ``n_samples`` training
    items and calls ``blur.calibrate(sharp, blurred, ...)``. Skipped when training resumes
    (iteration > 0: the calibrated values come from the checkpoint) or when ``blur`` has no
    ``calibrate`` (the conventional cycleGAN's network).

    With ``noise`` (the blur path's :class:`~bundle.networks.PoissonGaussianNoise`) and
    ``estimate_noise``, it also estimates the blurred domain's Poisson–Gaussian noise from the same
    samples (:func:`~bundle.physics.noise_estimation.estimate_poisson_gaussian`, in the normalised
    units that the PSF layer outputs after its gain and offset) and sets the noise module to it, so the
    sharp cycle trains G on ``h * x`` with the noise of real stacks. Both results are logged and
    written to ``record_path`` (JSON) when given.

    Args:
        blur: the PSF layer.
        dataset: the unpaired training dataset (items ``{"sharp", "blurred"}``).
        n_samples: number of items drawn.
        low_percentile: percentile of the blurred domain taken as background offset.
        high_percentile: percentile matched between the blurred domain and ``h * x``.
        noise: the blur path's noise module (or ``None``).
        estimate_noise: set ``noise`` from the data (False keeps the level it was built with, e.g.
            from a camera's known gain and read noise).
        record_path: JSON file for the calibration and noise estimate (e.g. ``<output_dir>/calibration.json``).
        psf_fit: optional blind PSF estimate run first (e.g.
            :class:`~bundle.physics.psf_estimation.SpectralPSFFit`): called as
            ``psf_fit(blur, sharp, blurred)`` on ``max(n_samples, psf_fit.n_samples)`` items when
            ``psf_fit.fittable(blur)`` (a fixed, non-blind PSF is left as it is); its record is logged
            and written with the calibration.
    """

    def __init__(
        self,
        blur: torch.nn.Module,
        dataset: Any,
        n_samples: int = 16,
        low_percentile: float = 1.0,
        high_percentile: float = 99.9,
        noise: torch.nn.Module | None = None,
        estimate_noise: bool = True,
        record_path: str | None = None,
        psf_fit: Any | None = None,
    ) -> None:
        self.blur = blur
        self.psf_fit = psf_fit
        self.dataset = dataset
        self.n_samples = int(n_samples)
        self.low_percentile = low_percentile
        self.high_percentile = high_percentile
        self.noise = noise
        self.estimate_noise = bool(estimate_noise)
        self.record_path = None if record_path is None else Path(record_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration > 0 or not hasattr(self.blur, "calibrate"):
            return
        fit_psf = self.psf_fit is not None and self.psf_fit.fittable(self.blur)
        count = max(self.n_samples, self.psf_fit.n_samples) if fit_psf else self.n_samples
        items = [self.dataset[i % len(self.dataset)] for i in range(count)]
        device = next(self.blur.parameters(), torch.empty(0)).device
        sharp = torch.stack([torch.as_tensor(it["sharp"]) for it in items]).float().to(device)
        blurred = torch.stack([torch.as_tensor(it["blurred"]) for it in items]).float().to(device)
        record: dict[str, Any] = {}
        if fit_psf:
            record["psf_fit"] = self.psf_fit(self.blur, sharp, blurred)
            logger.info(
                f"PSF fitted to the power spectra of {count} crops per domain: {record['psf_fit']['before']} -> "
                f"{record['psf_fit']['after']} (loss {record['psf_fit']['loss_before']:.4f} -> {record['psf_fit']['loss_after']:.4f})"
            )
        elif self.psf_fit is not None:
            logger.info("PSF fit skipped: the blur path's PSF is fixed (non-blind) or has no fitted parameters")
        sharp, blurred = sharp[: self.n_samples], blurred[: self.n_samples]
        with torch.no_grad():
            result = self.blur.calibrate(
                sharp, blurred, low_percentile=self.low_percentile, high_percentile=self.high_percentile
            )
        logger.info(f"blur path calibrated from {self.n_samples} samples: {result}")
        record["calibration"] = result
        if self.noise is not None and self.estimate_noise:
            from bundle.physics.noise_estimation import estimate_poisson_gaussian

            try:
                est = estimate_poisson_gaussian(blurred)
            except ValueError as exc:
                raise ValueError(f"cannot estimate the blurred domain's noise from the training crops: {exc}") from exc
            self.noise.set_parameters(est["photons_per_unit"], est["gaussian_sigma"], est["black_level"])
            record["noise_estimate"] = est
            logger.info(f"blur-path noise estimated from {est['voxels']} voxels: {self.noise.parameters_dict()}")
        if self.noise is not None:
            record["blur_noise"] = self.noise.parameters_dict()
        # ignite's rank (as MONAI's handlers use): bundle.distributed builds on this module, not the reverse
        if self.record_path is not None and idist.get_rank() == 0:  # it runs on every rank; rank 0 writes
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_json(record, self.record_path)


class AttachHandler:
    """List a handler that is defined elsewhere in the config (e.g. ``g_deblur_ema``, whose EMA model the
    validator uses) in ``train#handlers``: MONAI's property checks expect dicts there, not ``@`` refs.

    Args:
        handler: any object with ``attach(engine)``.
    """

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def attach(self, engine: Engine) -> None:
        self.handler.attach(engine)


class MallocPolicy:
    """Run an engine under a CPU ``malloc`` policy (:func:`bundle.allocator.malloc_policy`), from
    ``STARTED`` to ``COMPLETED``/``TERMINATE``.

    With glibc's defaults every large activation is a fresh ``mmap``, zero-filled page by page and
    unmapped when freed; ``"reuse"`` keeps freed memory for the next iteration. One full-size 64³
    training iteration on 2 CPU cores (``scripts/benchmark.py``'s settings, fresh processes): blind
    4.3-4.7 -> 3.2 s, conventional 8.0-8.3 -> 6.2 s, for a peak RSS of 1.6-1.7 GiB instead of 1.0
    (blind). Host memory only: on a GPU the activations are CUDA's and this changes little. After an
    exception the policy stays in effect (the next ``run`` re-enters it).

    Args:
        policy: ``"reuse"`` (faster, more resident memory), ``"release"`` (lowest resident memory,
            slower) or ``"system"`` (glibc's defaults).
    """

    def __init__(self, policy: str = "reuse") -> None:
        self.policy = check_malloc_policy(policy, "policy")
        self._block: Any = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.COMPLETED | Events.TERMINATE, self.stop)

    def start(self, engine: Engine | None = None) -> None:
        self.stop()
        self._block = malloc_policy(self.policy)
        self._block.__enter__()

    def stop(self, engine: Engine | None = None) -> None:
        if self._block is not None:
            block, self._block = self._block, None
            block.__exit__(None, None, None)

"""Training checkpoints: saved atomically, read as plain data only, resumed exactly (with the random states)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from bundle.flags import as_flag
from bundle.io import atomic_write, atomic_write_text

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
        self.overwrite = as_flag(overwrite, "overwrite")
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.engine_objects = tuple(engine_objects)
        self.save_interval = max(1, int(save_interval))
        self.n_saved = n_saved
        self.resume = as_flag(resume, "resume") or load_path is not None
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

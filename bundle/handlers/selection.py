"""Which model is kept: the best by a validation metric, or the last when there is no validation data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from bundle.flags import as_flag
from bundle.handlers.checkpoints import _atomic_json, atomic_torch_save

logger = logging.getLogger(__name__)


class BestModelSaver:
    """After each validation, save the generator (and companions) when the key metric improves.

    Writes ``save_dir/model.pt`` (the ``network``'s state dict: the model-zoo convention), the
    companions' state dicts as ``<name>.pt``, calls ``export(<tif>, <json>)`` on companions that
    have it (the PSF layer; ``exports[name]`` or ``save_dir/<name>.tif``, the JSON beside it), and records the score in ``save_dir/model.json``; all writes atomic.

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
        exports: TIFF path per exporting companion, e.g. ``{"blur": "models/blur.tif"}`` (the config's
            ``learned_psf``, which evaluation reads); others go to ``save_dir/<name>.tif``.
        resume: this run continues an earlier one (keep its record).
        overwrite: a fresh run may replace an earlier model found in ``save_dir``.
        preprocessing: how the training read its stacks where inference must do the same, written into
            every record under ``"preprocessing"`` (``configs/train.json``: ``{"hot_pixel_threshold":
            ...}``, read back by :func:`bundle.data.trained_hot_pixel_threshold`); None writes nothing.
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
        exports: dict[str, str] | None = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        self.resume = as_flag(resume, "resume")
        self.overwrite = as_flag(overwrite, "overwrite")
        self.save_dir = Path(save_dir)
        self.network = network
        self.metric_name = metric_name
        self.companions = {k: v for k, v in (companions or {}).items() if v is not None}
        self.filename = filename
        self.exports = {k: Path(v) for k, v in (exports or {}).items()}
        self.preprocessing = None if preprocessing is None else dict(preprocessing)
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
                tif = self.exports.get(key, self.save_dir / f"{key}.tif")
                module.export(str(tif), str(tif.with_suffix(".json")))
        if self.preprocessing is not None:
            record = {**record, "preprocessing": self.preprocessing}
        _atomic_json(record, self.record_path)
        self.written = True


class ModelWithoutValidation:
    """Training without validation data: say so at the start, write the last model at the end.

    Validation folders are optional (:func:`bundle.data.validation_datalist` gives an empty list when
    there are none, and MONAI's evaluator then skips its runs), so :class:`BestModelSaver` is never
    called. A model is never silently kept or silently missing: this handler logs a warning when
    training starts and, when training completes with nothing saved, writes the current weights
    (the EMA generator of the saver) with a record that says why. Nor is it silently worse than doing
    nothing: when the model of record scored no better on validation than the unprocessed input
    (``val_x`` against ``val_input_x`` in its record), training ends with a warning and the record gets
    ``"below_input": true`` (measured with sharp volumes of another structure than the stacks,
    ``docs/results.md`` session 35: the default never rose above the input there).

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
        self._check_against_input()

    def _check_against_input(self) -> None:
        """The record on disk, not this run's writes: a resumed run's model of record may be an earlier one."""
        path = self.saver.record_path
        if not path.is_file():
            return
        record = json.loads(path.read_text())
        name, score = record.get("metric"), record.get("score")
        baseline = (record.get("metrics") or {}).get(str(name).replace("val_", "val_input_", 1))
        if score is None or baseline is None or score > baseline:
            return
        _atomic_json({**record, "below_input": True}, path)
        logger.warning(
            f"{path}: the model of record ({name} {score:.4f}, epoch {record.get('epoch')}) is no better on validation "
            f"than the unprocessed input ({baseline:.4f}). Check that the sharp volumes show the stacks' kind of structure "
            "(docs/user_guide.md, section 5) and compare with Richardson-Lucy before using it"
        )

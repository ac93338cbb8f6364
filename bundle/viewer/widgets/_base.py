"""What the dock widgets share: a worker container with progress bar and Run/Cancel, error reports."""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import (
    Container,
    Label,
    ProgressBar,
    PushButton,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from superqt.utils import ensure_main_thread

from bundle.inference import DeconvolutionCancelled

__all__ = ["BUNDLE_ROOT", "TrainingCancelled"]

logger = logging.getLogger(__name__)

#: the folder holding ``configs/`` (the checkout or unpacked bundle this package runs from)
BUNDLE_ROOT = Path(__file__).resolve().parents[3]

_DECONVOLVE_WIDGETS: weakref.WeakSet = weakref.WeakSet()  # where a trained model is handed over


class TrainingCancelled(RuntimeError):
    """Raised in the Train widget's worker when Cancel stopped the run."""


def _report(message: str, error: bool = True) -> str:
    (show_error if error else show_info)(message)
    return message


class _Worker(Container):
    """A container with a progress bar, Run/Cancel buttons and one napari thread worker at a time.

    Subclasses define ``start()`` (what the Run button does: check the inputs, then ``_launch``)."""

    def __init__(self, viewer: napari.Viewer, run_text: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.viewer = viewer
        self.worker: Any = None
        self.last_message: str | None = None
        self._cancel = threading.Event()
        self.run_button = PushButton(text=run_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)

    def cancel(self) -> None:
        """Stop the running computation at its next step (safe from any thread)."""
        self._cancel.set()
        self._set_status("cancelling...")

    @ensure_main_thread
    def _set_status(self, text: str) -> None:
        self.status.value = text

    def _launch(self, function: Any, *args: Any, on_result: Any) -> None:
        self._cancel.clear()
        self.progress.value = 0
        self.run_button.enabled, self.cancel_button.enabled = False, True
        worker = create_worker(function, *args, _start_thread=False, _ignore_errors=True)  # errors: self._failed
        worker.returned.connect(on_result)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()

    @ensure_main_thread
    def _set_progress(self, done: int, total: int, text: str = "") -> None:
        self.progress.max = max(1, int(total))
        self.progress.value = min(int(done), self.progress.max)
        if text:
            self.status.value = text

    def _failed(self, exc: BaseException) -> None:
        cancelled = isinstance(exc, (DeconvolutionCancelled, TrainingCancelled))
        self.last_message = _report(str(exc), error=not cancelled)
        self.status.value = str(exc)

    def _finished(self) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False
        self.worker = None



"""The real error as the last line of a failed command-line run.

``python -m monai.bundle run`` evaluates the configs' ``$`` expressions and ``_target_`` components
through MONAI's config parser, which wraps every exception in ``RuntimeError: Failed to evaluate
...`` / ``Failed to instantiate component ...``, so the line a user reads last names neither the
file nor the problem. :func:`install_excepthook` (called on ``import bundle``, i.e. by every config)
keeps Python's full traceback and then prints the first exception under those wrappers once more as
the very last line, prefixed by ``Error:``. Python's exit status (1) is unchanged. Hand-written because neither MONAI nor Ignite
offers a hook for this: it only adds a line to ``sys.excepthook``'s output.
"""

from __future__ import annotations

import sys
import types

__all__ = ["install_excepthook", "root_cause"]

_installed = False


_WRAPPER_MESSAGES = ("Failed to evaluate", "Failed to instantiate component")


def _is_wrapper(exc: BaseException) -> bool:
    """MONAI's config layers: a RuntimeError that only says which expression or component failed."""
    return type(exc) is RuntimeError and str(exc).startswith(_WRAPPER_MESSAGES)


def root_cause(exc: BaseException) -> BaseException:
    """The first exception of ``exc``'s chain (``__cause__``, else ``__context__``) that is not a
    MONAI config wrapper: the error the bundle (or the library underneath) actually raised."""
    seen = {id(exc)}
    while _is_wrapper(exc):
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt
    return exc


def _hook(previous):
    def hook(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
        previous(kind, value, tb)
        if isinstance(value, KeyboardInterrupt):
            return
        cause = root_cause(value)
        if cause is not value:
            print(f"Error: {type(cause).__name__}: {cause}", file=sys.stderr)

    return hook


def install_excepthook() -> None:
    """Make the innermost cause of an uncaught exception the last line printed (idempotent)."""
    global _installed
    if not _installed:
        sys.excepthook = _hook(sys.excepthook)
        _installed = True

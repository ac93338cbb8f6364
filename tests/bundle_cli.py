"""Run ``python -m monai.bundle ...`` (or a script, or ``python -c ...``) in a new process without its start-up.

Every bundle command the tests start is a new process, as a user's is. Most of such a process's time on a
test's tiny data is spent before the first line of the command runs: importing MONAI (which imports torch,
ignite, MLflow, ITK, scipy, matplotlib, ...) takes 7-10 s on one CPU thread, and the interpreter's shutdown
another 1-2 s. Here each command is a child forked from a server process that imported those modules once
(the standard library's ``forkserver`` start method, with preloaded modules). The child starts from that
clean, single-threaded server (not from the test process: no pytest state, threads or capture is inherited),
takes the command's folder and environment, writes its stdout and stderr to files, runs ``monai.bundle``'s
``__main__`` (or the script, or the code) with the command's arguments, and ends as an interpreter does: its
``atexit`` functions run, a ``SystemExit`` gives its code, an uncaught exception goes to ``sys.excepthook``
(the bundle's, which ends stderr with the file and the problem) and gives 1, a signal its negative number.
The result is the ``subprocess.CompletedProcess`` that ``subprocess.run(..., capture_output=True,
text=True)`` returns.

What differs from a new interpreter: the preloaded modules were imported with the environment of the test
process, so a variable read at import time keeps the test process's value (the exception: torch's thread
count, set from the command's ``OMP_NUM_THREADS``). Tests that change such variables or the interpreter's
flags start a real subprocess instead (tests/test_allocator.py, tests/test_export.py, tests/test_handlers.py).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

#: imported once by the server; the commands' other modules are imported by each child as it needs them
PRELOAD = ["monai.bundle", "bundle", "bundle.data", "bundle.engine", "bundle.handlers", "bundle.networks",
           "bundle.inference", "bundle.evaluate", "bundle.simulate", "fire"]  # fmt: skip

_context = None


def _get_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(
    kind: str, target: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str
) -> None:
    """In the forked child: redirect stdout/stderr to files, then run ``python -m|script|-c target *args``."""
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # read by torch at import: the server imported it already
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # what the interpreter puts first on sys.path: the folder for -m, the script's folder, "" for -c
    sys.path.insert(0, {"module": cwd, "script": os.path.dirname(os.path.abspath(target)), "code": ""}[kind])
    code: int | str | None = 0
    try:
        if kind == "module":
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "script":
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the test's own code
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # as the interpreter does with an uncaught exception: its excepthook, status 1
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        atexit._run_exitfuncs()  # what an interpreter runs at exit (e.g. MLflow ends its run)
        for stream in (sys.stdout, sys.stderr):
            if not stream.closed:  # a command may close them (json.tool closes stdout)
                stream.flush()
    raise SystemExit(code)  # multiprocessing turns it into the exit status as the interpreter would


def _run(kind: str, target: str, args: list[str], cwd: str | Path, env: dict[str, str] | None,
         timeout: float | None) -> subprocess.CompletedProcess:  # fmt: skip
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="bundle_cli_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _get_context().Process(target=_child, args=(kind, target, list(args), str(cwd), env, out, err))
        proc.start()
        proc.join(timeout)
        shown = [sys.executable, *{"module": ["-m"], "script": [], "code": ["-c"]}[kind], target, *args]
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(shown, timeout)
        text = [Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in (out, err)]
    return subprocess.CompletedProcess(shown, proc.exitcode, text[0], text[1])


def run_module(module: str, args: list[str], cwd: str | Path, env: dict[str, str] | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run([python, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``."""
    return _run("module", module, args, cwd, env, timeout)


def run_code(code: str, args: list[str], cwd: str | Path, env: dict[str, str] | None = None,
             timeout: float | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run([python, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``."""
    return _run("code", code, args, cwd, env, timeout)


def run_script(script: str | Path, args: list[str], cwd: str | Path, env: dict[str, str] | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run([python, script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``."""
    return _run("script", str(script), args, cwd, env, timeout)

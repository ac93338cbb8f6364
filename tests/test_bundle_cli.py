"""tests/bundle_cli.py: a command forked from the preloaded server ends as the same command in a new interpreter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from bundle_cli import run_code, run_module, run_script


def test_output_status_folder_environment_and_last_line_match_a_new_interpreter(tmp_path):
    code = (
        "import atexit, os, sys, bundle\n"
        "atexit.register(lambda: print('at exit'))\n"
        "print(sys.argv[1:], os.getcwd(), os.environ['BUNDLE_CLI_TEST'], sys.path[0] == '')\n"
        "sys.stderr.write('a warning\\n')\n"
        "raise RuntimeError('Failed to evaluate x') from ValueError(sys.argv[1] + ': contains NaN')\n"
    )
    env = {**os.environ, "BUNDLE_CLI_TEST": "set"}
    forked = run_code(code, ["a.tif"], cwd=tmp_path, env=env, timeout=600)
    real = subprocess.run([sys.executable, "-c", code, "a.tif"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert forked.returncode == real.returncode == 1
    assert forked.stdout == real.stdout == f"['a.tif'] {tmp_path} set True\nat exit\n"
    assert forked.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "a warning"
    # the bundle's excepthook ends the output with the file and the problem, in both
    assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1] == "Error: ValueError: a.tif: contains NaN"
    assert "BUNDLE_CLI_TEST" not in os.environ  # the test process's environment is untouched


def test_exit_codes_signals_and_timeouts(tmp_path):
    assert run_code("import sys; sys.exit(3)", [], cwd=tmp_path).returncode == 3
    stopped = run_code("raise SystemExit('stopped: bad input')", [], cwd=tmp_path)
    assert (stopped.returncode, stopped.stderr) == (1, "stopped: bad input\n")
    assert run_code("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", [], cwd=tmp_path).returncode == -signal.SIGKILL
    with pytest.raises(subprocess.TimeoutExpired):
        run_code("import time; time.sleep(600)", [], cwd=tmp_path, timeout=2)


def test_scripts_and_modules_see_their_arguments_and_path(tmp_path):
    script = tmp_path / "tool" / "show.py"
    script.parent.mkdir()
    script.write_text("import json, sys\nprint(json.dumps([sys.argv, sys.path[0]]))\n")
    res = run_script(script, ["--x", "1"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [[str(script), "--x", "1"], str(script.parent)]

    (tmp_path / "data.json").write_text('{"b": 1, "a": [2]}')
    res = run_module("json.tool", ["--sort-keys", "data.json"], cwd=tmp_path)
    assert (res.returncode, json.loads(res.stdout)) == (0, {"a": [2], "b": 1})
    assert res.args[1:3] == ["-m", "json.tool"]

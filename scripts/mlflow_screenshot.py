"""Screenshot of MLflow's web UI on a run tracked with ``--tracking configs/tracking/mlflow.json``.

Starts ``mlflow server`` on 127.0.0.1 on the run's sqlite store, waits until it answers, opens the
run's page (or its metric charts) in headless Chromium and saves a PNG. Needs a Chromium binary
(Debian: ``apt-get install chromium``); nothing is downloaded.

    python scripts/mlflow_screenshot.py --output_dir eval --out docs/mlflow.png

``--output_dir`` is the training's ``output_dir`` (it holds ``mlruns.db`` and ``mlartifacts``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _latest_run(db: Path) -> tuple[str, str]:
    """``(experiment_id, run_uuid)`` of the most recent run in an MLflow sqlite store."""
    with sqlite3.connect(db) as con:
        row = con.execute("select experiment_id, run_uuid from runs order by start_time desc limit 1").fetchone()
    if row is None:
        raise SystemExit(f"{db}: no MLflow run in this store (train with --tracking configs/tracking/mlflow.json)")
    return str(row[0]), str(row[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the training's output_dir (mlruns.db, mlartifacts)")
    parser.add_argument("--out", default="docs/mlflow.png", help="PNG to write")
    parser.add_argument("--page", default="overview", choices=["overview", "model-metrics", "artifacts", "metric"],
                        help="tab of the run page (default: overview, with tags, parameters and metric values); "
                             "'metric': the chart page of --metrics")
    parser.add_argument("--metrics", default="cycle_sharp,cycle_blurred,adv_sharp",
                        help="metrics plotted with --page metric (comma-separated)")
    parser.add_argument("--size", default="1600,1000", help="window size W,H")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: found on PATH)")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds the page may take to render")
    args = parser.parse_args(argv)

    browser = args.chromium or next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        raise SystemExit("no Chromium found: install it (apt-get install chromium) or pass --chromium")
    out_dir = Path(args.output_dir)
    db = out_dir / "mlruns.db"
    if not db.is_file():
        raise SystemExit(f"{db}: not found (train with --tracking configs/tracking/mlflow.json first)")
    experiment, run = _latest_run(db)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db.resolve()}",
         "--default-artifact-root", str((out_dir / "mlartifacts").resolve()), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("mlflow server did not start") from None
                time.sleep(1)
        if args.page == "metric":
            keys = [m.strip() for m in args.metrics.split(",") if m.strip()]
            quote = urllib.parse.quote
            url = (f"{base}/#/metric?runs={quote(json.dumps([run]))}&metric={quote(json.dumps(keys[0]))}"
                   f"&experiments={quote(json.dumps([experiment]))}&plot_metric_keys={quote(json.dumps(keys))}&x_axis=step")
        else:
            url = f"{base}/#/experiments/{experiment}/runs/{run}" + ("" if args.page == "overview" else f"/{args.page}")
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial.png")
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={args.size}", f"--virtual-time-budget={int(args.wait * 1000)}",
             f"--screenshot={tmp}", url],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180,
        )
        tmp.replace(out)
        print(f"wrote {out} ({url})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

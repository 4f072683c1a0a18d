"""Screenshot of the MLflow UI's runs page for an experiment, its parent runs expanded so their
child runs (the sweep's trials, the benchmark's method x seed runs) show, with the Dataset column.

    .venv/bin/python bench/mlflow_screenshot.py --tracking-uri sqlite:////root/natra_ray_results/mlflow.db \\
        --experiment natra --out docs/results/mlflow_runs.png

Starts ``mlflow ui`` on a free loopback port against the store (read only: the UI writes nothing
unless clicked), drives headless Chromium (Debian's ``chromium`` + ``chromedriver`` through
Selenium, as ``natra_ray.explorer.browser`` does), opens the experiment's runs table, expands every
parent run, adds the metric columns of ``--metrics``, saves a PNG and stops the UI.
``--experiment`` defaults to the experiment with the most recent run.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import requests

from natra_ray.explorer.browser import BrowserUnavailable, chrome, wait_for

# MLflow 3.17's UI picks an experiment's view from its GenAI / Model training switch (the URL's
# workflowType, else the browser's last choice, else GenAI), not from the experiment's tags.
RUNS_VIEW = "workflowType=machine_learning"
# A parent run's expander: the button in its Run Name cell (children have none). Each is clicked
# once: a second click would fold it again.
_RUN_NAME_CELL = '[role="gridcell"][col-id="attributes.`Run Name`"]'
_EXPAND_JS = """
const done = window.__natraExpanded = window.__natraExpanded || new Set();
let n = 0;
for (const cell of document.querySelectorAll(arguments[0])) {
  const b = cell.querySelector('button[data-component-id*="runnamecellrenderer"]');
  const a = cell.querySelector('a[href*="/runs/"]');
  if (!b || !a || done.has(a.getAttribute('href'))) continue;
  done.add(a.getAttribute('href'));
  b.click();
  n++;
}
return n;
"""
_DATASET_CELL = '[role="gridcell"][col-id="attributes.`Dataset`"]'
_CLOSE_ASSISTANT = '[data-component-id$="assistant.chat_panel.close"]'
# The runs table shows no metric by default; these are what a sweep is judged by.
DEFAULT_METRICS = ("val_natural_acc", "test_clean_acc", "test_natural_acc", "test_corruption_mean_acc")


def show_metrics(driver: Any, names: Sequence[str]) -> List[str]:
    """Tick each metric in the table's Columns selector (searched by name, the node whose text
    is exactly the name); returns those found."""
    from selenium.webdriver.common.keys import Keys

    if not names:
        return []
    driver.find_element("css selector", '[data-testid="column-selection-dropdown"]').click()
    box = wait_for(lambda: driver.find_element("css selector", 'input[placeholder="Search columns"]'), 30,
                   "the column selector")
    found = []
    for name in names:
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(name)
        time.sleep(0.8)
        nodes = [n for n in driver.find_elements("css selector", '[role="dialog"] .du-bois-light-tree-treenode')
                 if n.text.strip() == name]
        if nodes:
            nodes[0].find_element("css selector", ".du-bois-light-tree-checkbox").click()
            found.append(name)
            time.sleep(0.5)
    box.send_keys(Keys.ESCAPE)
    time.sleep(0.5)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(tracking_uri: str, port: int, log_path: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(log_path, "w")
    # its own process group: stopping it also stops the server's worker processes
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ui(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow ui did not answer on {base} within {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def stop_ui(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pick_experiment(tracking_uri: str, name: Optional[str]) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise SystemExit(f"error: no experiment {name!r} in {tracking_uri}; experiments: {names}")
        return exp
    latest = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not latest:
        raise SystemExit(f"error: {tracking_uri} has no runs")
    return client.get_experiment(latest[0].info.experiment_id)


def _park_pointer(driver: Any) -> None:
    """Move the pointer off the table (its last click leaves a cell tooltip) and drop the focus."""
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("document.activeElement && document.activeElement.blur()")
    footer = driver.find_elements("xpath", "//*[contains(text(), 'matching runs')]")
    if footer:
        ActionChains(driver).move_to_element(footer[-1]).perform()
        time.sleep(1.0)  # the tooltip fades out


def screenshot(tracking_uri: str, out: Path, experiment: Optional[str] = None, width: int = 2000,
               height: int = 700, timeout: float = 180.0, metrics: Sequence[str] = DEFAULT_METRICS) -> Dict[str, Any]:
    """Save the PNG; returns what the page showed: the run names (parents and, below each,
    its children), the Dataset column's texts, the metric columns added and how many parents
    were expanded."""
    exp = pick_experiment(tracking_uri, experiment)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as tmp:
        log_path = Path(tmp) / "mlflow_ui.log"
        proc = start_ui(tracking_uri, port, log_path)
        driver = None
        try:
            wait_ui(base, proc, log_path, timeout)
            driver = chrome(width, height)
            driver.get(f"{base}/#/experiments/{exp.experiment_id}/runs?{RUNS_VIEW}")
            # the table is rendered once the run names are in it
            wait_for(lambda: driver.find_elements("css selector", f"{_RUN_NAME_CELL} a"), timeout, "the runs table")
            time.sleep(1.0)
            for b in driver.find_elements("css selector", _CLOSE_ASSISTANT):  # the chat panel hides columns
                if b.is_displayed():
                    b.click()
            metrics_shown = show_metrics(driver, metrics)
            expanded = 0
            for _ in range(5):  # expanding one parent re-renders the rows: repeat until none is left
                n = driver.execute_script(_EXPAND_JS, _RUN_NAME_CELL)
                expanded += n
                if not n:
                    break
                time.sleep(1.0)
            time.sleep(2.0)  # the child rows' metrics and datasets arrive after the rows
            _park_pointer(driver)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            shown = {"experiment": exp.name, "experiment_id": exp.experiment_id, "expanded": expanded, "out": out,
                     "runs": [a.text for a in driver.find_elements("css selector", f"{_RUN_NAME_CELL} a")],
                     "datasets": [c.text for c in driver.find_elements("css selector", _DATASET_CELL)],
                     "metrics": metrics_shown}
        finally:
            if driver is not None:
                driver.quit()
            stop_ui(proc)
    print(f"{out}: experiment {exp.name!r} ({exp.experiment_id}), {len(shown['runs'])} run rows shown, "
          f"{expanded} parent run(s) expanded")
    return shown


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True, help="the MLflow store, e.g. sqlite:////abs/path/mlflow.db")
    ap.add_argument("--out", required=True, type=Path, help="PNG to write")
    ap.add_argument("--experiment", default=None, help="experiment name (default: the one with the latest run)")
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=700)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the UI and the table")
    ap.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS),
                    help=f"metric columns to show (default: {' '.join(DEFAULT_METRICS)}; none: --metrics)")
    args = ap.parse_args(argv)
    try:
        screenshot(args.tracking_uri, args.out, args.experiment, args.width, args.height, args.timeout, args.metrics)
    except BrowserUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The notebook as a user sees it: JupyterLab in headless Chromium, *Run All* through the UI.

JupyterLab is started from this environment on a copy of the notebook with a tiny configuration
(one epoch), and Chromium (Debian's /usr/bin/chromium, driven by Playwright) runs every cell.
What JupyterLab holds in its notebook model is then checked: no error, no stderr box, the Top-1
line, every figure rendered as an image, one line per progress bar. A screenshot of the whole
notebook and its outputs are kept in tests/artifacts/browser/ (CI keeps that folder).

Skipped, with the reason, where Chromium or Playwright is missing (CI installs both).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LABELS_UNORDERED, NOTEBOOK, ROOT, make_dataset, write_config

from tl_helpers.run_notebook import kernel_environment

pytestmark = pytest.mark.notebook

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
SERVER_START_S = 120
PAGE_LOAD_S = 120
RUN_ALL_S = 300  # the tiny run takes under a minute, 82 s on a busy 2-core machine
# JupyterLab user settings: no "Jupyter news" pop-up over the screenshot, no update check,
# every cell rendered (by default JupyterLab 4 renders only the cells in view).
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
# A Keras-style progress bar ("12/36 [====>....]"): on screen only its final state remains.
PROGRESS_BAR = re.compile(r"(\d+)/(\d+) \[[=>.]*\]")
# A long step's timer ("Writing the SavedModel ... 4 s"): replaced by "...: done in 5.3 s".
TICK = re.compile(r" \.\.\. \d+ s$")


def _sync_playwright():
    """Playwright's sync API, or a skip saying how to get it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -r requirements.txt")
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}: apt-get install chromium")
    return sync_playwright


def _project(folder: Path) -> Path:
    """A copy of the notebook beside a tiny dataset and configuration: one epoch, no MCT."""
    shutil.copy(NOTEBOOK, folder / NOTEBOOK.name)
    make_dataset(folder / "data", LABELS_UNORDERED)
    write_config(folder, epochs=1, learning_rate=0.01)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_environment(home: Path) -> dict[str, str]:
    """The kernel's environment as a user's: this checkout importable, the user's TensorFlow
    log level (tests hide TensorFlow's notices; a user does not), what the C++ side writes to
    stderr shown in the notebook, private Jupyter settings."""
    env = kernel_environment()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # under pytest, ipykernel leaves descriptor 2 alone
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JUPYTER_CONFIG_DIR"] = str(home / "config")
    env["JUPYTERLAB_SETTINGS_DIR"] = str(home / "settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(home / "workspaces")
    for name, values in SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return env


def _start_lab(root: Path, home: Path, port: int, token: str, log) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--expose-app-in-browser",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    return subprocess.Popen(
        command,
        env=_server_environment(home),
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_server(server: subprocess.Popen, port: int, token: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s")


def _stop(server: subprocess.Popen) -> None:
    """Stop JupyterLab (it shuts its kernel down); kill its process group if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        server.send_signal(signal.SIGINT)  # the second one skips the "shut down?" question
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


# JavaScript run in the page: the notebook panel, its kernel, and its model as nbformat JSON.
KERNEL_READY = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    return Boolean(kernel && kernel.status === "idle" && panel.content.model);
}"""
RUN_FINISHED = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const nb = panel.content.model.toJSON();
    const code = nb.cells.filter(c => c.cell_type === "code");
    const failed = code.some(c => c.outputs.some(o => o.output_type === "error"));
    const done = code.every(c => c.execution_count !== null);
    const idle = panel.sessionContext.session.kernel.status === "idle";
    return idle && (done || failed);
}"""
NOTEBOOK_JSON = "() => window.jupyterapp.shell.currentWidget.content.model.toJSON()"
# How tall the page must be to show the whole notebook: its scrolling area's content height
# plus everything around that area. Also closes the file browser and scrolls to the top.
PAGE_HEIGHT_FOR_ALL = """() => {
    window.jupyterapp.shell.collapseLeft();
    const panel = window.jupyterapp.shell.currentWidget.content.node;
    const outer = panel.querySelector(".jp-WindowedPanel-outer") || panel;
    outer.scrollTop = 0;
    return outer.scrollHeight + (window.innerHeight - outer.clientHeight);
}"""


def _run_all_in_browser(playwright, url: str, screenshot: Path) -> dict:
    """Open the notebook, *Run All*, wait for the end; return the notebook model's JSON."""
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
    )
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, timeout=PAGE_LOAD_S * 1000)
        page.wait_for_function(KERNEL_READY, timeout=PAGE_LOAD_S * 1000, polling=500)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_function(RUN_FINISHED, timeout=RUN_ALL_S * 1000, polling=1000)
        page.wait_for_timeout(1000)  # the last outputs reach the screen
        notebook = page.evaluate(NOTEBOOK_JSON)
        for _ in range(2):  # the second pass measures the notebook laid out at full height
            height = page.evaluate(PAGE_HEIGHT_FOR_ALL)
            page.set_viewport_size({"width": 1280, "height": min(height, 30000)})
            page.wait_for_timeout(1000)
        page.screenshot(path=str(screenshot), full_page=True)
        return notebook
    finally:
        browser.close()


def _outputs(notebook: dict, kind: str) -> list[tuple[str, dict]]:
    """(cell source, output) for each output of type `kind`."""
    return [
        ("".join(cell["source"]), out)
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for out in cell["outputs"]
        if out["output_type"] == kind
    ]


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def test_run_all_in_jupyterlab_shows_what_a_user_should_see(tmp_path):
    sync_playwright = _sync_playwright()
    (tmp_path / "project").mkdir()
    root, home = _project(tmp_path / "project"), tmp_path / "jupyter"
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    port, token = _free_port(), secrets.token_hex(16)
    log_path = ARTIFACTS / "jupyterlab.log"
    with open(log_path, "w") as log:
        server = _start_lab(root, home, port, token, log)
        try:
            _wait_for_server(server, port, token, log_path)
            url = f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}"
            with sync_playwright() as playwright:
                notebook = _run_all_in_browser(playwright, url, ARTIFACTS / "notebook.png")
        finally:
            _stop(server)
    (ARTIFACTS / "notebook.ipynb").write_text(json.dumps(notebook, indent=1))
    print(f"\nscreenshot: {ARTIFACTS / 'notebook.png'}")

    errors = _outputs(notebook, "error")
    assert not errors, [(src[:80], out["ename"], out["evalue"]) for src, out in errors]
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code)
    streams = _outputs(notebook, "stream")
    stderr = [
        (src[:60], _text(out["text"])[:300]) for src, out in streams if out["name"] == "stderr"
    ]
    assert not stderr, stderr  # JupyterLab shows each as a pink box

    stdout = "\n".join(_text(out["text"]) for _, out in streams)
    assert re.search(r"Top-1 accuracy", stdout), stdout[-2000:]
    for line in stdout.splitlines():
        for done, total in PROGRESS_BAR.findall(line):
            assert done == total, f"a progress bar left a line behind: {line!r}"
        assert not TICK.search(line), f"a step's timer left a line behind: {line!r}"

    plot_cells = [c for c in code if "tl.plots.plot_" in "".join(c["source"])]
    images = {
        "".join(c["source"])
        for c in plot_cells
        for out in c["outputs"]
        if "image/png" in out.get("data", {})
    }
    expected = {"".join(c["source"]) for c in plot_cells if "quantized" not in "".join(c["source"])}
    assert expected and expected <= images, sorted(expected - images)
    with open(ARTIFACTS / "notebook.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"

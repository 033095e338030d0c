"""What a user sees: a real TensorBoard server, read by headless Chromium (skipped where Chromium is not installed:
`apt-get install chromium` or `chromium-headless-shell`). Screenshots are left in the test's temp directory for a
person to look at; the assertions read the page after TensorBoard's JavaScript has drawn it.

TensorBoard's Scalars, Custom Scalars, Images, Histograms and Text tabs select no run at all when a log directory
holds more than 40 runs (their charts are empty until "Toggle all runs"); a fit that wrote a run per layer reached
that after two fits. Those tabs keep their run selector in shadow DOM, which `--dump-dom` does not print, so the page
is opened inside a probe page served from TensorBoard's own origin (a small proxy), whose script walks the shadow
roots and counts the ticked runs.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from mm_lightning.cli import main
from tests.conftest import SMALL, free_port, new_project

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
# headless always: Debian's `chromium` otherwise wants an X server ("Missing X server or $DISPLAY")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--virtual-time-budget=25000"]

PROBE = """<html><body><pre id="result">pending</pre><iframe id="tb" width="1400" height="1000"></iframe><script>
const frame = document.getElementById("tb");
frame.src = decodeURIComponent(location.hash.slice(1));
function walk(root, out) {
  for (const el of root.querySelectorAll("*")) { out.push(el); if (el.shadowRoot) walk(el.shadowRoot, out); }
  return out;
}
setTimeout(() => {
  const boxes = walk(frame.contentDocument, []).filter(e => e.tagName === "PAPER-CHECKBOX");
  const label = e => { let row = e; for (let i = 0; i < 3 && !row.textContent.trim(); i++) row = row.parentElement;
                      return row.textContent.trim(); };  // a run's box is unlabelled: its name is in its row
  const runs = boxes.map(e => [label(e), e.getAttribute("aria-checked") === "true"]);
  const panes = walk(frame.contentDocument, []).filter(e => e.tagName === "TF-CATEGORY-PAGINATED-VIEW" && e.category)
                  .filter(e => e.category.name).map(e => [e.category.name, !!e.opened]);  // Scalars' groups
  document.getElementById("result").textContent = JSON.stringify({runs, panes});
}, 15000);
</script></body></html>"""


def _browser(url: str, *args: str) -> str:
    return subprocess.run([CHROMIUM, *FLAGS, *args, url], capture_output=True, text=True, timeout=120).stdout


@contextlib.contextmanager
def _tensorboard(logdir: Path):
    """A TensorBoard server on 127.0.0.1 and, on another port, a proxy to it that also serves the probe page."""
    port = free_port()
    exe = shutil.which("tensorboard") or os.path.join(os.path.dirname(sys.executable), "tensorboard")
    server = subprocess.Popen(
        [exe, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if self.path == "/probe.html":
                status, headers, body = 200, {"Content-Type": "text/html"}, PROBE.encode()
            else:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                keep = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                request = urllib.request.Request(f"http://127.0.0.1:{port}{self.path}", data, keep, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=30) as r:
                        status, headers, body = r.status, {"Content-Type": r.headers.get("Content-Type", "")}, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, {}, e.read()
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        server.terminate()
        server.wait(timeout=10)


def _served_runs(base: str, expected: int) -> list[str]:
    deadline, runs = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(runs) < expected:
        runs = json.loads(urllib.request.urlopen(f"{base}/data/runs", timeout=10).read())
        time.sleep(0.5)
    return runs


def _probe(base: str, tab: str) -> tuple[dict[str, bool], list[tuple[str, bool]]]:
    """A Polymer tab as the page shows it: the runs of its run selector (its check boxes named version_...), each
    with whether it is ticked, and its groups of charts in page order, each with whether it is open."""
    page = f"{base}/probe.html#{urllib.parse.quote(f'{base}/#{tab}', safe='')}"
    dom = _browser(page, "--dump-dom")
    found = re.search(r'<pre id="result">([^<]*)</pre>', dom)
    assert found and found.group(1) != "pending", dom[-2000:]
    state = json.loads(found.group(1))
    runs = {name: ticked for name, ticked in state["runs"] if name.startswith("version_")}
    return runs, [(name, opened) for name, opened in state["panes"]]


@pytest.fixture(scope="module")
def one_fit(tmp_path_factory, names_file) -> Path:
    """A fit's lightning_logs/ (the default diagnostics, a small net)."""
    with new_project(tmp_path_factory, names_file, "browser") as project:
        args = ["fit", "--trainer.max_steps", "300", *SMALL, "--data.steps_per_epoch", "300"]
        assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    return project / "lightning_logs"


@pytest.mark.slow
@needs_browser
@pytest.mark.parametrize("fits", [1, 5])
def test_every_tab_shows_every_run_without_a_click(one_fit, tmp_path, fits):
    """1 and 5 fits in one lightning_logs/ (the 4 more are copies of the first: what counts is the runs each adds):
    every run ticked in Scalars, Custom Scalars and Images, and drawn in Time Series; in Time Series and Scalars the
    loss group first and open, then the activations (open) and the updates."""
    logs = tmp_path / "lightning_logs"
    for i in range(fits):
        shutil.copytree(one_fit / "version_0", logs / f"version_{i}")
    with _tensorboard(logs) as base:
        runs = _served_runs(base, fits)
        assert sorted(runs) == [f"version_{i}" for i in range(fits)]  # a fit adds one run, no sub-runs
        for tab in ("scalars", "custom_scalars", "images"):
            seen, panes = _probe(base, tab)
            assert seen == {f"version_{i}": True for i in range(fits)}, (tab, seen)
            if tab == "scalars":  # the loss first and open, then the activations (TensorBoard opens two groups)
                assert panes[:3] == [("0 loss", True), ("1 activations", True), ("2 updates", False)], panes
        _browser(f"{base}/#timeseries", f"--screenshot={tmp_path / f'timeseries_{fits}.png'}")
        _browser(f"{base}/#scalars", f"--screenshot={tmp_path / f'scalars_{fits}.png'}")
        dom = _browser(f"{base}/#timeseries", "--dump-dom")
    assert (tmp_path / f"timeseries_{fits}.png").stat().st_size > 10_000
    drawn = set(re.findall(r'data-id="defaultExperimentId/([^"]+)"', dom))  # rows of a chart's data table
    assert drawn == {f"version_{i}" for i in range(fits)}, drawn
    found = re.findall(r'class="group-title" title="([^"]+)".{0,1000}?svgicon="expand_(less|more)_24px"', dom)
    groups = list(dict.fromkeys(found))  # in page order, each open (less) or closed; TensorBoard opens the first two
    names = ["0 loss", "1 activations", "2 updates", "3 gradients", "4 weight gradients", "5 more"]
    assert groups[:6] == list(zip(names, ["less", "less", "more", "more", "more", "more"])), groups
    cards = re.findall(r'<tb-truncated-path[^>]* title="([^"]+)"', dom)  # a card's tag, in page order
    assert cards[:2] == ["0 loss/train/loss", "0 loss/val/loss"], cards[:5]  # the loss on top
    # a chart per layer, named and numbered by depth (TensorBoard sorts tags naturally: 02 before 10)
    first = re.findall(r'title="(1 activations/[^"]+)"', dom)
    assert first[:2] == ["1 activations/output std · 01 net.layers.2", "1 activations/output std · 02 net.layers.5"]

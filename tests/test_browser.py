"""What a user sees: a real TensorBoard server, read by headless Chromium (skipped where Chromium is not installed:
`apt-get install chromium-headless-shell`). The screenshot is left in the test's temp directory for a person to look
at; the assertions read the page's DOM after TensorBoard's JavaScript has drawn it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from mm_lightning.cli import main
from tests.conftest import SMALL, free_port

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


def _browser(url: str, *args: str) -> str:
    cmd = [CHROMIUM, "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--virtual-time-budget=20000"]
    return subprocess.run([*cmd, *args, url], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install chromium-headless-shell)")
def test_time_series_shows_informative_charts_first_one_line_per_layer(project, monkeypatch, tmp_path):
    monkeypatch.chdir(project)
    args = ["fit", "--trainer.max_steps", "300", *SMALL, "--data.steps_per_epoch", "300"]
    assert main([*args, "--trainer.enable_progress_bar", "false"]) == 0
    port = free_port()
    exe = shutil.which("tensorboard") or os.path.join(os.path.dirname(sys.executable), "tensorboard")
    server = subprocess.Popen(
        [exe, "--logdir", str(project / "lightning_logs"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/#timeseries"
        _browser(url, f"--screenshot={tmp_path / 'timeseries.png'}")
        dom = _browser(url, "--dump-dom")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "timeseries.png").stat().st_size > 10_000
    found = re.findall(r">(\d [a-z ]+|health|sampled|train|val)</span>", dom)
    groups = list(dict.fromkeys(g for g in found if not g.endswith((" card", " cards"))))  # in page order
    assert groups[:5] == ["1 activations", "2 gradients", "3 weight gradients", "4 updates", "5 more"], groups
    first_charts = re.findall(r'title="(1 activations/[^"]+)"', dom)
    assert set(first_charts) == {"1 activations/std", "1 activations/saturated %"}, first_charts
    for layer in ("net.layers.2", "net.layers.5"):  # one run, so one colour, per layer, named in the legend
        assert f"version_0/layers/{layer}" in dom

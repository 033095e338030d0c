"""Shared fixtures: the real names.txt, a temp project directory, and running the real CLI."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# names.txt is never committed: the README's set-up puts it in data/, CI keeps it beside the checkout
# (../shared/data/names.txt), and $MM_LIGHTNING_NAMES may point anywhere; the first that exists is used
CANDIDATES = [ROOT / "data" / "names.txt", ROOT.parent / "shared" / "data" / "names.txt"]
CANDIDATES += [Path(os.environ["MM_LIGHTNING_NAMES"])] if os.environ.get("MM_LIGHTNING_NAMES") else []
NAMES = next((p for p in CANDIDATES if p.is_file()), CANDIDATES[-1])

# a small, fast network for CLI tests (the default one is tested on its own)
SMALL = ["--model.net.n_hidden", "16", "--model.net.n_layers", "2", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="session")
def names_file() -> Path:
    if not NAMES.is_file():
        tried = ", ".join(str(p) for p in CANDIDATES)
        pytest.fail(
            f"names.txt not found (tried {tried}); copy it to one of them or set MM_LIGHTNING_NAMES=FILE "
            "(online, `python -m mm_lightning.cli download` fetches it)"
        )
    return NAMES


@contextlib.contextmanager
def new_project(tmp_path_factory, names_file: Path, name: str):
    """A fresh project directory (data/names.txt in place) as the working directory inside the block, for a
    module-scoped fixture that trains once (monkeypatch.chdir is per test)."""
    home = tmp_path_factory.mktemp(name)
    (home / "data").mkdir()
    shutil.copy(names_file, home / "data" / "names.txt")
    cwd = os.getcwd()
    os.chdir(home)  # trained as a user would, from the project's root, with relative paths
    try:
        yield home
    finally:
        os.chdir(cwd)


@pytest.fixture
def project(tmp_path: Path, names_file: Path) -> Path:
    """A directory laid out as a user's checkout: data/names.txt present, runs go to lightning_logs/."""
    (tmp_path / "data").mkdir()
    shutil.copy(names_file, tmp_path / "data" / "names.txt")
    return tmp_path


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, check: bool = True, preexec_fn=None
) -> subprocess.CompletedProcess:
    """python -m mm_lightning.cli ARGS in cwd, as a user runs it (preexec_fn: e.g. a resource limit on the child)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MM_LIGHTNING_RUN_VERSION", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=preexec_fn,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run directory, read back with TensorBoard's own event reader. A per-layer diagnostics tag
    ("1 activations/output std · 03 net.layers.8") is keyed without its depth number ("1 activations/output std ·
    net.layers.8"), so a test names a layer without counting; a loss by its metric's name ("train/loss", written
    as "0 loss/train/loss": mm_lightning/runlogger.py). Tests of the tags as written read tb_tags."""
    out = {}
    for tag, points in tb_tags(run_dir).items():
        out[re.sub(r" · \d+ ", " · ", tag.removeprefix(LOSS_GROUP))] = points
    return out


def tb_tags(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run directory as written, sub-directories (TensorBoard runs of their own) prefixed
    "<sub-run>:": a fit writes none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for directory in sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents*")}):
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        acc.Reload()
        run = directory.relative_to(run_dir).as_posix()
        for tag in acc.Tags()["scalars"]:
            out[tag if run == "." else f"{run}:{tag}"] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def flat_tag(tag: str) -> str:
    """A diagnostics scalar as scalars() keys it from TensorBoard ("<quantity> · <layer>") from its flat name (as
    CSV holds it)."""
    for flat, quantity in DIAGNOSTICS_TAGS:
        if tag.startswith(flat + "/"):
            return f"{quantity} · {tag[len(flat) + 1 :]}"
    return tag


DIAGNOSTICS_TAGS = [  # flat family, its TensorBoard chart: written out here, not imported from the package
    ("act/std", "1 activations/output std"),
    ("act/saturation", "1 activations/saturated %"),
    ("act/mean", "5 more/activation mean"),
    ("act/dead", "5 more/dead units %"),
    ("grad/mean", "5 more/output-gradient mean"),
    ("grad/std", "3 gradients/output-gradient std"),
    ("weight/grad_data_ratio", "4 weight gradients/grad:data"),
    ("weight/grad_std", "5 more/weight-gradient std"),
    ("weight/grad_mean", "5 more/weight-gradient mean"),
    ("update/log10_ratio", "2 updates/log10 update:data (guide -3)"),  # weights; biases and BatchNorm: "5 more/..."
]


LOSS_GROUP = "0 loss/"  # the run's TensorBoard group of the losses: written out here, not imported from the package


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (for a TensorBoard server, a DDP rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

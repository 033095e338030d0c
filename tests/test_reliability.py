"""Reliability: exact resume, crash-safe restart, one-line errors on bad input, non-finite losses, safe checkpoint
loading, concurrent runs."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm_lightning.cli import main
from tests.conftest import SMALL, new_project, run_cli, scalars

FAST = [*SMALL, "--diagnostics.every_n_steps", "50", "--diagnostics.figures_every_n_steps", "0"]


def _fit(root, steps: int, *extra: str) -> int:
    return main(["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *FAST, *extra])


def _last(root) -> dict:
    paths = sorted(Path(root).glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return torch.load(paths[-1], weights_only=True)


def _same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:  # parameters and BatchNorm buffers, bitwise
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]


# ------------------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize(
    "first, total, extra",
    [
        (200, 400, ["--data.steps_per_epoch", "100"]),  # resume at an epoch end
        pytest.param(  # between checkpoint intervals: last.ckpt is at 130
            130, 260, ["--data.steps_per_epoch", "100"], marks=pytest.mark.slow
        ),
        pytest.param(  # across the LR decay
            100, 200, ["--data.steps_per_epoch", "100", "--model.milestones", "[150]"], marks=pytest.mark.slow
        ),
    ],
    ids=["at-epoch-end", "between-checkpoints", "across-lr-milestone"],
)
def test_resume_is_bitwise_the_same_as_one_run(project, monkeypatch, first, total, extra):
    monkeypatch.chdir(project)
    assert _fit("whole", total, *extra) == 0
    assert _fit("split", first, *extra) == 0
    assert _last("split")["global_step"] == first
    assert _fit("split", total, "--ckpt_path", "last", *extra) == 0
    _same_state(_last("whole"), _last("split"))
    whole = scalars(project / "whole" / "lightning_logs" / "version_0")["train/loss"]
    split = scalars(project / "split" / "lightning_logs" / "version_0")["train/loss"]
    assert split == whole  # the same curve, point for point, in the same run directory


# ------------------------------------------------------------------------------------------ crash-safe restart

# fit, with every checkpoint write made slow half-way through, announced on stdout so the test can kill it there
SLOW_SAVE = """
import io, sys, time
import torch
import mm_lightning.runs as runs
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    print("SAVING", flush=True)
    time.sleep(0.5)
    f.write(data[len(data) // 2 :])
runs.torch.save = slow_save
from mm_lightning.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(project: Path, steps: int, *extra: str) -> subprocess.Popen:
    args = ["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", "runs", *FAST]
    args += ["--data.steps_per_epoch", "100", "--trainer.enable_progress_bar", "false", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MM_LIGHTNING_RUN_VERSION", None)
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *args],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _kill_at_save(proc: subprocess.Popen, nth: int) -> None:
    seen = 0
    for line in proc.stdout:
        if line.startswith("SAVING"):
            seen += 1
            if seen == nth:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
    pytest.fail(f"the run ended before its checkpoint write number {nth}")


@pytest.mark.slow
def test_sigkill_at_any_moment_loses_no_more_than_the_last_interval(project, monkeypatch):
    monkeypatch.chdir(project)  # data/names.txt is the project's copy, never the developer's checkout
    reference = project / "reference"
    assert _fit(reference, 600, "--data.steps_per_epoch", "100") == 0
    checkpoints = project / "runs" / "lightning_logs" / "version_0" / "checkpoints"

    # 1: killed half-way through writing its third checkpoint file (epoch 200: best, then last)
    _kill_at_save(_start(project, 600), nth=3)
    assert list(checkpoints.glob(".*.tmp")), "the kill was meant to land inside a write"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 100  # the old one, whole

    # 2: restarted, then killed at an arbitrary moment
    proc = _start(project, 600, "--ckpt_path", "last")
    time.sleep(4.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert step % 100 == 0 and step >= 100

    # 3: killed during a write again, then 4: restarted to the end
    _kill_at_save(_start(project, 600, "--ckpt_path", "last"), nth=1)
    proc = _start(project, 600, "--ckpt_path", "last")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    assert sorted(p.name for p in (project / "runs" / "lightning_logs").iterdir()) == ["version_0"]
    assert not list(checkpoints.glob(".*.tmp"))  # leftovers of killed writes are cleaned up on restart
    for ckpt in checkpoints.glob("*.ckpt"):
        torch.load(ckpt, weights_only=True)  # every checkpoint readable
    _same_state(_last(reference), _last(project / "runs"))  # and the result is the uninterrupted run's
    curve = [s for s, _ in scalars(project / "runs" / "lightning_logs" / "version_0")["train/loss"]]
    assert curve == sorted(set(curve)) and curve[-1] == 599  # one curve, each step once (every 50 steps)


# ------------------------------------------------------------------------------------------------- bad input


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, names_file) -> Path:
    """One finished 100-step run, trained once for the module (the tests below only read it or refuse to touch it)."""
    with new_project(tmp_path_factory, names_file, "finished") as home:
        assert _fit("runs", 100, "--data.steps_per_epoch", "100") == 0
    return home / "runs"


@pytest.fixture
def trained(project, monkeypatch, finished_run):
    """A finished run to point bad commands at (a copy of finished_run in this test's own project directory); every
    test checks that nothing in it changes."""
    monkeypatch.chdir(project)
    shutil.copytree(finished_run, project / "runs", symlinks=True)
    before = _tree(project / "runs"), _tree(project / "data")
    yield project
    after = _tree(project / "runs"), _tree(project / "data")
    assert after == before, "a failing command changed files that were already written"


def _fails(capsys, args: list[str], expected: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert "Traceback" not in err[0]


def _write(project: Path, name: str, content: bytes) -> str:
    path = project / name
    path.write_bytes(content)
    return name


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist; pass --data.path"),
        (b"", "holds no words"),
        (b"\n  \n\t\n", "holds no words"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "looks binary"),
        ("émile\n".encode("latin-1"), "is not UTF-8"),
        (b"anna\nmr.smith\n", "bad.txt:2: 'mr.smith' contains '.', the boundary token"),
        (b"anna\n" + b"x" * 5000 + b"\n", "bad.txt:2: a line of 5000 characters"),
        (b"anna\nbob\ncarl\n", "only 3 words"),
        (b"anna\nbo\tb\n", "control character U+0009"),
    ],
    ids=["missing", "empty", "blank", "binary", "not-utf8", "boundary-dot", "long-line", "too-few", "control"],
)
def test_bad_data_file(trained, capsys, content, expected):
    if content is not None:
        _write(trained, "bad.txt", content)
    _fails(capsys, ["fit", "--data.path", "bad.txt", "--trainer.default_root_dir", "runs", *FAST], expected)


def test_data_normalisation(tmp_path):
    from mm_lightning.data import build_vocab, read_words

    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffAnna\r\n\r\n  bob  \r\nZoë\nE\u0301lise\rcarl\n".encode())
    words = read_words(path)
    assert words == ["Anna", "bob", "Zoë", "Élise", "carl"]  # BOM, CRLF/CR, blanks, spaces, NFC; case kept
    assert build_vocab(words) == ".AZabceilnorsÉë"  # NFC: "E" + combining accent is the one character "É"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data.block_size", "0"], "--data.block_size must be at least 1, got 0"),
        (["--model.net.n_layers", "-1"], "--model.net.n_layers must be 0 or more, got -1"),
        (["--data.batch_size", "0"], "--data.batch_size must be at least 1, got 0"),
        (["--model.lr", "0"], "--model.lr must be positive"),
        (["--model.lr", "-0.1"], "--model.lr must be positive"),
        (["--model.milestones", "[100, 50]"], "--model.milestones must be positive and strictly increasing"),
        (["--model.net.init", "xavier"], "--model.net.init: expected one of ['torch', 'kaiming', 'normal', 'zeros']"),
        (["--data.batch_size", "lots"], "--data.batch_size: expected int, got lots"),
        (["--diagnostics.every_n_steps", "30"], "histograms_every_n_steps (1000) must be 0 or a multiple"),
        (["--weights_only", "false"], "--weights_only false is refused"),
    ],
)
def test_bad_config_values(trained, capsys, args, expected):
    _fails(capsys, ["fit", "--trainer.default_root_dir", "fresh", *FAST, *args], expected)
    assert not (trained / "fresh").exists()  # refused before a run directory was made


def test_checkpoint_of_another_vocabulary_or_architecture(trained, capsys):
    _write(trained, "other.txt", "\n".join(f"Name{i}" for i in range(30)).encode())
    root = ["--trainer.default_root_dir", "runs"]
    _fails(capsys, ["fit", "--ckpt_path", "last", *root, "--data.path", "other.txt"], "vocabulary")
    _fails(capsys, ["test", "--ckpt_path", "last", *root, "--data.path", "other.txt"], "vocabulary")
    _fails(
        capsys,
        ["fit", "--ckpt_path", "last", *root, "--model.net.n_layers", "3"],
        "was trained with model.net.n_layers=2 but this command gives 3",
    )
    _fails(capsys, ["fit", "--ckpt_path", "last", *root, "--model.lr", "0.5"], "model.lr=0.1")


def test_checkpoint_paths_that_are_not_checkpoints(trained, capsys):
    root = ["--trainer.default_root_dir", "runs"]
    _fails(capsys, ["fit", "--ckpt_path", "nowhere.ckpt", *root], "checkpoint nowhere.ckpt does not exist")
    _fails(capsys, ["fit", "--ckpt_path", "runs", *root], "checkpoint runs is a directory")
    _write(trained, "junk.ckpt", os.urandom(4096))
    _fails(capsys, ["fit", "--ckpt_path", "junk.ckpt", *root], "junk.ckpt is not a readable checkpoint")
    torch.save({"weights": torch.zeros(3)}, trained / "foreign.ckpt")
    _fails(capsys, ["test", "--ckpt_path", "foreign.ckpt", *root], "is not an mm_lightning checkpoint")
    _fails(capsys, ["sample", "--ckpt_path", "junk.ckpt"], "is not a readable checkpoint")
    _fails(capsys, ["fit", "--ckpt_path", "last", "--trainer.default_root_dir", "empty"], "no checkpoint to resume")


def test_bad_sampling_arguments(trained, capsys):
    root = ["--root_dir", "runs"]
    _fails(capsys, ["sample", *root, "--temperature", "0"], "--temperature must be positive, got 0.0")
    _fails(capsys, ["sample", *root, "--temperature", "-1"], "--temperature must be positive")
    _fails(capsys, ["sample", *root, "--num_samples", "0"], "--num_samples must be at least 1, got 0")
    _fails(capsys, ["sample", *root, "--num_samples", "ten"], "invalid int value: 'ten'")
    _fails(capsys, ["diagnose", "--steps", "x"], "--steps must be a whole number")


@pytest.mark.slow
def test_a_real_process_exits_non_zero_with_one_line(project):
    proc = run_cli(["fit", "--data.path", "missing.txt"], cwd=project, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: data file missing.txt does not exist; pass --data.path FILE (one word per line)"
    ]
    debug = run_cli(["fit", "--data.path", "missing.txt", "--debug"], cwd=project, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug asks for it


# --------------------------------------------------------------------------------------------- non-finite loss

NO_BN = ["--model.net.batchnorm", "false", "--model.net.output_batchnorm", "false"]


def test_a_non_finite_loss_stops_training_and_names_the_layer(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert _fit("runs", 50, *NO_BN, "--model.lr", "1e38") == 1
    err = capsys.readouterr().err
    assert "the loss became inf at step 1; the first non-finite output is net.layers.0 (Linear)" in err


@pytest.mark.slow
def test_the_last_good_checkpoint_survives_divergence(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    deep = ["--model.net.n_hidden", "100", "--model.net.n_layers", "5"]
    assert _fit("runs", 50, *deep, *NO_BN, "--model.lr", "1e33", "--data.steps_per_epoch", "1") == 1
    assert "val/loss became inf at step 3" in capsys.readouterr().err
    ckpt = _last("runs")
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert (
        _fit(
            "runs2", 50, *NO_BN, "--model.lr", "1e38", "--data.steps_per_epoch", "1", "--trainer.limit_val_batches", "0"
        )
        == 1
    )  # without validation the epoch-end check guards
    for path in Path("runs2").glob("lightning_logs/version_0/checkpoints/*.ckpt"):
        assert all(torch.isfinite(v).all() for v in torch.load(path, weights_only=True)["state_dict"].values())


# ---------------------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_cannot_run_code(trained, capsys):
    marker = trained / "pwned"
    evil = trained / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {}}, "x": _Payload(str(marker))}, evil)
    probe = trained / "probe.ckpt"
    torch.save({"x": _Payload(str(trained / "probe-ran"))}, probe)
    torch.load(probe, weights_only=False)  # the payload is real: a full unpickle runs it
    assert (trained / "probe-ran").exists()
    (trained / "probe-ran").unlink()
    probe.unlink()
    root = ["--trainer.default_root_dir", "runs"]
    for args in (
        ["fit", "--ckpt_path", str(evil), *root],
        ["test", "--ckpt_path", str(evil), *root],
        ["validate", "--ckpt_path", str(evil), *root],
        ["sample", "--ckpt_path", str(evil)],
    ):
        _fails(capsys, args, "refusing to load")
        assert not marker.exists()
    from mm_lightning.runs import SafeCheckpointIO

    with pytest.raises(Exception, match="refusing to load"):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)  # asking for a full unpickle changes nothing
    assert not marker.exists()
    evil.unlink()


# ---------------------------------------------------------------------------------------------- concurrent runs


@pytest.mark.slow
def test_runs_started_together_never_share_a_directory(project):
    env = {**os.environ}
    env.pop("MM_LIGHTNING_RUN_VERSION", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mm_lightning.cli",
                "fit",
                "--trainer.max_steps",
                "200",
                "--trainer.default_root_dir",
                "runs",
                "--model.lr",
                lr,
                *FAST,
            ],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in ("0.05", "0.2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    runs = sorted((project / "runs" / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    lrs = set()
    for run in runs:  # each directory holds exactly one run's files, consistent with each other
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert f"lr: {ckpt['hyper_parameters']['lr']}" in (run / "config.yaml").read_text()
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        lrs.add(ckpt["hyper_parameters"]["lr"])
    assert lrs == {0.05, 0.2}
    newest = max(runs, key=lambda r: (r / "checkpoints" / "last.ckpt").stat().st_mtime_ns)
    proc = run_cli(
        ["fit", "--ckpt_path", "last", "--trainer.max_steps", "300", "--trainer.default_root_dir", "runs", *FAST],
        cwd=project,
    )
    assert f"run runs/lightning_logs/{newest.name} at step 200" in proc.stdout  # says which one it picked


# ------------------------------------------------------------------------------------------------- preemption


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_a_signal_checkpoints_the_current_step_and_the_run_continues_exactly(project, monkeypatch, sig, status):
    """What a cluster scheduler sends before a time limit (SIGTERM), or Ctrl-C: the run stops after the step under
    way, writes last.ckpt there, says so and exits 128 + signal; `fit --ckpt_path last` then ends exactly where an
    uninterrupted run ends."""
    monkeypatch.chdir(project)
    args = [*FAST, "--data.steps_per_epoch", "1000", "--trainer.enable_progress_bar", "false"]
    assert _fit("whole", 3000, *args) == 0
    cmd = [sys.executable, "-m", "mm_lightning.cli", "fit", "--trainer.max_steps", "3000"]
    cmd += ["--trainer.default_root_dir", "runs", *args]
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = project / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the first epoch's checkpoint (step 1000): training is under way
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    step = torch.load(last, weights_only=True)["global_step"]
    assert 1000 < step < 3000, step  # the step it was at, not the last epoch end
    line = [x for x in err.splitlines() if x.startswith("error: interrupted by")]
    assert len(line) == 1 and f"at step {step}: last.ckpt written there" in line[0], err[-2000:]
    assert _fit("runs", 3000, "--ckpt_path", "last") == 0
    _same_state(_last("whole"), _last("runs"))
    whole, runs = (scalars(project / d / "lightning_logs" / "version_0")["train/loss"] for d in ("whole", "runs"))
    stopped = [] if step % 50 == 0 else [step - 1]  # + the stopped step's loss, which Lightning logs as it stops
    assert [p for p in runs if p[0] not in stopped] == whole


@pytest.mark.parametrize("how", ["copied", "moved"])
@pytest.mark.slow
def test_a_moved_or_copied_run_continues_in_place(project, monkeypatch, how):
    """cp -a A B (or mv A B), then fit in B: B's own last.ckpt goes on (no last-v1.ckpt), A is untouched."""
    import shutil

    monkeypatch.chdir(project)
    assert _fit("A", 200, "--data.steps_per_epoch", "100") == 0
    (shutil.copytree if how == "copied" else shutil.move)("A", "B")
    assert _fit("B", 400, "--ckpt_path", "last", "--data.steps_per_epoch", "100") == 0
    checkpoints = project / "B" / "lightning_logs" / "version_0" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "last.ckpt" in names and not any(n.startswith("last-v") for n in names), names
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] == 400
    dirpaths = [Path(v["dirpath"]).resolve() for k, v in state["callbacks"].items() if "RunCheckpoint" in k]
    assert dirpaths == [checkpoints.resolve()]
    best = [p for p in names if p.startswith("best-")]
    assert len(best) == 1, names  # the best is tracked across the move: one, not one per place
    if how == "copied":
        assert _last("A")["global_step"] == 200  # the original run is as it was
    assert _fit("B", 500, "--ckpt_path", "last", "--data.steps_per_epoch", "100") == 0
    assert _last("B")["global_step"] == 500


@pytest.mark.slow
def test_resuming_a_finished_run_keeps_its_last_val_loss(project, monkeypatch):
    """A run that had finished, resumed with no steps left (or killed after its final checkpoint): its final
    val/loss point stays in TensorBoard (the resumed writer purges from the checkpoint's step on)."""
    monkeypatch.chdir(project)
    assert _fit("runs", 200, "--data.steps_per_epoch", "100") == 0
    before = scalars(project / "runs" / "lightning_logs" / "version_0")["val/loss"]
    assert [s for s, _ in before] == [100, 200]
    assert _fit("runs", 200, "--ckpt_path", "last", "--data.steps_per_epoch", "100") == 0
    assert scalars(project / "runs" / "lightning_logs" / "version_0")["val/loss"] == before
    assert _fit("runs", 300, "--ckpt_path", "last", "--data.steps_per_epoch", "100") == 0
    after = scalars(project / "runs" / "lightning_logs" / "version_0")["val/loss"]
    assert after[:2] == before and [s for s, _ in after] == [100, 200, 300]


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_data_path_that_is_not_a_regular_file_is_refused_at_once(project, monkeypatch, capsys, kind):
    monkeypatch.chdir(project)
    target = {"fifo": project / "names.fifo", "device": Path("/dev/zero"), "directory": project / "data"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    start = time.monotonic()
    assert main(["fit", "--data.path", str(target), "--trainer.max_steps", "1"]) == 2
    assert time.monotonic() - start < 30  # no hang
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data file {target} is" in err[0] and "--data.path FILE" in err[0], err


@pytest.mark.slow
def test_checkpoints_get_the_mode_new_files_get(project, monkeypatch):
    monkeypatch.chdir(project)
    previous = os.umask(0o022)
    try:
        assert _fit("runs", 20, "--data.steps_per_epoch", "10") == 0
    finally:
        os.umask(previous)
    for ckpt in (project / "runs").glob("lightning_logs/version_0/checkpoints/*.ckpt"):
        assert ckpt.stat().st_mode & 0o777 == 0o644, ckpt  # readable by the group and others, as any new file


@pytest.mark.slow
def test_one_run_has_one_writer(project, monkeypatch):
    """Two `fit --ckpt_path last` of one run at once: the second is refused in one line naming the first's pid; the
    lock goes with its holder (a killed one included), so the run can be continued afterwards."""
    monkeypatch.chdir(project)
    assert _fit("runs", 100, "--data.steps_per_epoch", "50") == 0
    cmd = [sys.executable, "-m", "mm_lightning.cli", "fit", "--ckpt_path", "last", "--trainer.max_steps", "100000"]
    cmd += ["--trainer.default_root_dir", "runs", *FAST, "--data.steps_per_epoch", "50"]
    first = subprocess.Popen(cmd, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = project / "runs" / "lightning_logs" / "version_0" / ".lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not lock.exists() or lock.read_text() != str(first.pid)):
        time.sleep(0.05)
    try:
        second = run_cli(["fit", "--ckpt_path", "last", "--trainer.default_root_dir", "runs"], project, check=False)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert lines[-1] == (
            f"error: run runs/lightning_logs/version_0 is being trained by process {first.pid}; wait for it to "
            "finish (or stop it), or start a new run without --ckpt_path"
        ), second.stderr
    finally:
        first.kill()
        first.wait()
    assert _fit("runs", 150, "--ckpt_path", "last", "--data.steps_per_epoch", "50") == 0  # the lock went with it


# ----------------------------------------------------------------- item 5 and 7: one line instead of a traceback


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\xff\xfe trainer: [\n", "--config bad.yaml is not UTF-8 text (byte 0xff at position 0); save it as UTF-8"),
        (b"", "--config bad.yaml is empty: it holds no settings"),
        (b"# only a comment\n", "--config bad.yaml is empty: it holds no settings"),
        (b"trainer:\n  max_steps: [\n", "--config bad.yaml is not valid YAML at line 3, column 1"),
        (b"- a\n- b\n", "--config bad.yaml must be a mapping of settings"),
    ],
    ids=["not-utf8", "empty", "comment-only", "yaml-error", "a-list"],
)
def test_bad_config_files(trained, capsys, content, expected):
    _write(trained, "bad.yaml", content)
    for command in ("fit", "validate", "diagnose"):
        _fails(capsys, [command, "--config", "bad.yaml", "--trainer.default_root_dir", "fresh"], expected)
    assert not (trained / "fresh").exists()


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", "4294967296"])
def test_a_seed_numpy_cannot_take(trained, capsys, seed):
    expected = f"--seed_everything must be a whole number from 0 to 4294967295, got {seed}"
    _fails(capsys, ["fit", "--seed_everything", seed, "--trainer.default_root_dir", "fresh", *FAST], expected)
    assert not (trained / "fresh").exists()


def test_a_model_too_big_for_memory_is_one_line_before_any_run_directory(trained, capsys):
    args = ["fit", "--model.net.n_hidden", "1000000", "--trainer.default_root_dir", "fresh"]
    _fails(capsys, args, "out of memory (asked for 3.6 TiB): lower --data.batch_size, --model.net.n_hidden")
    assert not (trained / "fresh").exists()


def test_sample_streams_any_number_of_names(trained, capsys, monkeypatch):
    import mm_lightning.cli as cli

    monkeypatch.setattr(cli, "SAMPLE_CHUNK", 7)  # many chunks of a few names: memory stays flat
    assert main(["sample", "--root_dir", "runs", "--num_samples", "30"]) == 0
    chunked = capsys.readouterr().out.split()
    monkeypatch.setattr(cli, "SAMPLE_CHUNK", 10_000)
    assert main(["sample", "--root_dir", "runs", "--num_samples", "7"]) == 0
    assert len(chunked) == 30 and chunked[:7] == capsys.readouterr().out.split()  # the first chunk as one batch


@pytest.mark.slow
def test_sample_into_a_closed_pipe_stops_quietly(trained):
    script = "import sys; from mm_lightning.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", script, "sample", "--root_dir", "runs", "--num_samples", "50000"]
    proc = subprocess.Popen(cmd, cwd=trained, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    assert proc.wait(timeout=120) == 141 and b"Traceback" not in proc.stderr.read()


def test_diagnose_refuses_a_file_as_its_figures_directory_before_any_work(trained, capsys):
    (trained / "taken").write_text("mine")
    _fails(capsys, ["diagnose", "--save_figures", "taken"], "--save_figures taken is a file; give a directory")
    assert (trained / "taken").read_text() == "mine"


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda c: c["hyper_parameters"].update(extra=1), "hyperparameter extra is not one this project's model takes"),
        (lambda c: c["hyper_parameters"]["net"].update(depth=3), "hyperparameter net.depth is not one"),
        (lambda c: c.update(global_step=1.5), "global_step is 1.5, not a step count: the checkpoint is damaged"),
        (lambda c: c.update(global_step="100"), "global_step is '100', not a step count"),
        (
            lambda c: c["hyper_parameters"]["net"].update(n_hidden=10**7),
            "its weights do not match its own hyperparameters",
        ),
    ],
    ids=["extra-key", "extra-net-key", "float-step", "string-step", "absurd-size"],
)
def test_a_damaged_checkpoint_is_refused_in_one_line(trained, capsys, damage, expected):
    checkpoint = torch.load(next((trained / "runs").rglob("last.ckpt")), weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, trained / "damaged.ckpt")
    _fails(capsys, ["sample", "--ckpt_path", "damaged.ckpt"], expected)
    _fails(capsys, ["fit", "--ckpt_path", "damaged.ckpt", "--trainer.default_root_dir", "fresh"], expected)
    assert not (trained / "fresh").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_earlier_checkpoint_survives(
    project, capsys, monkeypatch, finished_run
):
    import errno

    monkeypatch.chdir(project)
    shutil.copytree(finished_run, project / "runs", symlinks=True)  # a 100-step run, 100 steps an epoch
    trained = project

    real = os.fsync

    def full(fd):  # the checkpoint's bytes reach the disk at fsync: there the disk turns out full
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".last.ckpt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    before = torch.load(next((trained / "runs").rglob("last.ckpt")), weights_only=True)["global_step"]
    monkeypatch.setattr(os, "fsync", full)
    args = ["fit", "--ckpt_path", "last", "--trainer.max_steps", "200", "--trainer.default_root_dir", "runs"]
    assert main([*args, *FAST, "--data.steps_per_epoch", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: disk full writing runs/lightning_logs/version_0/checkpoints/last.ckpt"), err
    assert "checkpoints already written are intact" in err
    monkeypatch.undo()
    last = next((trained / "runs").rglob("last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == before  # the earlier checkpoint, whole


def test_an_unwritable_directory_is_one_line(project, capsys, monkeypatch):
    """(As root, permissions do not stop writes: the refusal is simulated where the run directory is made.)"""
    import errno

    import mm_lightning.runs as runs

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.chdir(project)
    monkeypatch.setattr(runs.Path, "mkdir", refused)
    _fails(capsys, ["fit", "--trainer.default_root_dir", "/srv/ro", *FAST], "cannot write /srv/ro/lightning_logs")


def test_predict_leaves_no_event_file_in_the_run(trained, capsys):
    run = next((trained / "runs").glob("lightning_logs/version_0"))
    before = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    assert (
        main(["predict", "--ckpt_path", "last", "--trainer.default_root_dir", "runs", "--data.num_samples", "3"]) == 0
    )
    assert sorted(p.name for p in run.glob("events.out.tfevents.*")) == before


def test_a_command_that_fails_before_logging_leaves_no_empty_run_directory(trained, capsys):
    args = ["fit", "--data.batch_size", "300000000", "--trainer.default_root_dir", "runs", *FAST]
    _fails(capsys, args, "out of memory (asked for 223.5 GiB): lower --data.batch_size")
    assert sorted(p.name for p in (trained / "runs" / "lightning_logs").iterdir()) == ["version_0"]  # no version_1

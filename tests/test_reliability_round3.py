"""Reliability, round 3 (issue 25): crafted checkpoint paths touch nothing outside the run; signals from process
start to exit; no silent wrong results; one line for every failure class; reading a large names file."""

import contextlib
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
from mm_lightning.runs import PATH_KEYS
from tests.conftest import SMALL, new_project, run_cli, scalars

FAST = [*SMALL, "--diagnostics.every_n_steps", "50", "--diagnostics.figures_every_n_steps", "0"]
FAST += ["--trainer.enable_progress_bar", "false"]


def _fit(root, steps: int, *extra: str) -> int:
    return main(["fit", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), *FAST, *extra])


def _checkpoints(root) -> Path:
    return Path(root) / "lightning_logs" / "version_0" / "checkpoints"


# ----------------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("symlinked", [False, True], ids=["dotdot", "symlink"])
def test_a_crafted_checkpoint_cannot_delete_files_outside_its_run(run_copy, capsys, symlinked):
    """A run folder someone sent, whose last.ckpt says its last/best checkpoints are <dirpath>/../../../../VICTIM:
    Lightning deletes the previous last and the worst best when it writes new ones; none of those files may go."""
    project = run_copy  # a finished 100-step run, in the current directory
    checkpoints = _checkpoints(project / "runs")
    victims = [project / f"VICTIM{i}" for i in range(3)]
    (project / "elsewhere").mkdir()
    (checkpoints / "link").symlink_to(project / "elsewhere")  # inside by name, outside once resolved
    for victim in [*victims, *(project / "elsewhere" / v.name for v in victims)]:
        victim.write_text("precious")
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    key = next(k for k in last["callbacks"] if k.startswith("RunCheckpoint"))
    state = last["callbacks"][key]
    escape = f"{state['dirpath']}/../../../../"
    state.update(  # a consistent state (the kth best is one of the best k, worse than any real val/loss)
        last_model_path=escape + "VICTIM0",
        best_model_path=escape + "VICTIM1",
        kth_best_model_path=escape + "VICTIM2",
        kth_value=torch.tensor(99.0),
        best_model_score=torch.tensor(99.0),
        best_k_models={escape + "VICTIM2": torch.tensor(99.0)},
    )
    if symlinked:  # the same, through a directory symlink inside the checkpoints directory
        state.update({k: state[k].replace(escape, f"{state['dirpath']}/link/") for k in PATH_KEYS})
        state["best_k_models"] = {state["kth_best_model_path"]: torch.tensor(99.0)}
        victims = [project / "elsewhere" / v.name for v in victims]
    torch.save(last, checkpoints / "last.ckpt")
    capsys.readouterr()
    assert _fit("runs", 200, "--ckpt_path", "last", "--data.steps_per_epoch", "100") == 0
    err = capsys.readouterr().err
    assert all(v.read_text() == "precious" for v in victims), [str(v) for v in victims if not v.exists()]
    lines = [x for x in err.splitlines() if "lead outside" in x]
    assert len(lines) == 1 and "ignored 4 checkpoint path(s)" in lines[0], err[-2000:]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 200


# ------------------------------------------------------------------------------------------------------ signals


def _signal_at(monkeypatch, hook: str, sig: int, when=lambda trainer: True, times: int = 1) -> None:
    """Send this process a real signal from a Lightning hook (a moment a timer cannot hit reliably)."""
    from mm_lightning.runs import StopOnSignal

    sent = []

    def send(self, trainer, *args):
        if len(sent) < times and when(trainer):
            for _ in range(times):
                sent.append(sig)
                os.kill(os.getpid(), sig)
                time.sleep(0.01)  # the handler runs between bytecodes; the second signal comes after the first

    monkeypatch.setattr(StopOnSignal, hook, send, raising=False)


def _lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [x for x in err.splitlines() if x.startswith("error:")]


@pytest.mark.parametrize("resumed", [False, True], ids=["new-run", "resumed-run"])
def test_sigterm_before_the_first_step_exits_143_with_a_line(run_copy, monkeypatch, capsys, resumed):
    """Lightning's sanity check runs before training starts: a SIGTERM there used to end the fit with status 0 and
    no line, so a requeue-on-143 recipe thought the job had finished."""
    before = (_checkpoints(run_copy / "runs") / "last.ckpt").read_bytes()
    _signal_at(monkeypatch, "on_fit_start", signal.SIGTERM)
    capsys.readouterr()
    args = ["runs", 200, "--ckpt_path", "last"] if resumed else ["fresh", 200]
    assert _fit(*args, "--data.steps_per_epoch", "100") == 143
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "interrupted by SIGTERM before the first step: no checkpoint written" in lines[0], lines
    if resumed:
        assert (_checkpoints(run_copy / "runs") / "last.ckpt").read_bytes() == before  # untouched
    else:
        assert not list((run_copy / "fresh").rglob("*.ckpt"))
        assert not (run_copy / "fresh" / "lightning_logs" / "version_0").exists()  # the empty claim is removed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() gives the caller its handlers back


def _same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]


@pytest.mark.slow
def test_sigterm_under_gradient_accumulation_continues_bitwise(project, monkeypatch, capsys):
    """A SIGTERM between two accumulated batches: training stops after the batch that steps the optimizer, so the
    resumed run sees the same batches in the same pairs (stopping mid-pair shifted every later epoch end by one)."""
    monkeypatch.chdir(project)
    args = ["--data.steps_per_epoch", "100", "--trainer.accumulate_grad_batches", "2"]
    assert _fit("whole", 300, *args) == 0
    # batch 300 is the first of a pair (batches 300 and 301 make optimizer step 151)
    _signal_at(monkeypatch, "on_train_batch_start", signal.SIGTERM, lambda t: t.fit_loop.total_batch_idx == 300)
    capsys.readouterr()
    assert _fit("split", 300, *args) == 143
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "interrupted by SIGTERM at step 151: last.ckpt written there" in lines[0], lines
    monkeypatch.undo()
    monkeypatch.chdir(project)
    assert _fit("split", 300, "--ckpt_path", "last", *args) == 0
    whole, split = (torch.load(_checkpoints(d) / "last.ckpt", weights_only=True) for d in ("whole", "split"))
    _same_weights(whole, split)
    val = [scalars(project / d / "lightning_logs" / "version_0")["val/loss"] for d in ("whole", "split")]
    assert [s for s, _ in val[1] if s % 50 == 0] == [s for s, _ in val[0]]  # epoch ends where they were


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    _signal_at(monkeypatch, "on_train_batch_start", signal.SIGINT, lambda t: t.global_step == 150, times=2)
    assert _fit("runs", 300, "--data.steps_per_epoch", "100") == 130
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "stopped at once by a second Ctrl-C (SIGINT) at step 150" in lines[0], lines
    assert torch.load(_checkpoints("runs") / "last.ckpt", weights_only=True)["global_step"] == 100  # it stays


CLI_FIT = ["-m", "mm_lightning.cli", "fit", "--trainer.max_steps", "300", "--data.steps_per_epoch", "100", *FAST]


@pytest.mark.slow
def test_a_signal_at_any_moment_never_exits_0(project):
    """Real signals from process start to exit (imports, parsing, the sanity check, training, checkpoint writes,
    the end): the exit status is 128 + signal (or death by that signal, before Python has a handler), never 0,
    with at most one line, and a checkpoint it names is there at the step it names."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MM_LIGHTNING_RUN_VERSION", None)
    start = time.monotonic()
    subprocess.run([sys.executable, *CLI_FIT, "--trainer.default_root_dir", "whole"], cwd=project, env=env, check=True)
    whole = time.monotonic() - start
    moments = [0.0, 0.05, 0.3, 0.6, 0.9]
    for i, (fraction, sig) in enumerate((f, s) for f in moments for s in (signal.SIGTERM, signal.SIGINT)):
        if sig == signal.SIGINT and fraction not in (0.05, 0.6):
            continue
        root = f"run{i}"
        proc = subprocess.Popen(
            [sys.executable, *CLI_FIT, "--trainer.default_root_dir", root],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(fraction * whole)
        finished_first = proc.poll() is not None
        proc.send_signal(sig)
        err = proc.communicate(timeout=300)[1]
        where = f"signal {sig} at {fraction:.2f} x {whole:.1f} s: exit {proc.returncode}\n{err[-2000:]}"
        if finished_first:
            assert proc.returncode == 0, where
            continue
        assert proc.returncode in (128 + sig, -sig), where
        lines = _lines(err)
        assert len(lines) <= 1 and (lines or proc.returncode == -sig), where
        if lines and "written there" in lines[0]:
            step = int(lines[0].split(" at step ")[1].split(":")[0])
            last = project / root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
            assert torch.load(last, weights_only=True)["global_step"] == step, where



def test_a_signal_inside_an_import_that_catches_everything_still_exits_128_plus_signal(tmp_path):
    """SIGTERM while the CLI imports torch: an extension's import (numpy's, under torch's) can catch what a handler
    raises, and go on to import the module a second time (a traceback, exit 1). The early handler must end the process
    itself: 143 and its one line, whatever the code it interrupted does with exceptions."""
    (tmp_path / "catching.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "except BaseException:\n"
        "    pass  # an import that swallows everything\n"
    )
    code = "from mm_lightning import signals; signals.install_early(); import catching; print('went on')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr == "error: interrupted by SIGTERM while starting: nothing was written\n"

# ----------------------------------------------------------------------------------------- no silent wrong results


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, names_file) -> Path:
    """One finished 100-step run (batch size 64), shared: each test works on its own copy (see `run_copy`)."""
    with new_project(tmp_path_factory, names_file, "trained") as root:
        assert _fit("runs", 100, "--data.steps_per_epoch", "100", "--data.batch_size", "64") == 0
    return root


@pytest.fixture
def run_copy(trained_once, tmp_path, monkeypatch) -> Path:
    shutil.copytree(trained_once, tmp_path / "p")
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def _edit_last(project: Path, edit) -> bytes:
    path = _checkpoints(project / "runs") / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path.read_bytes()


def _refused(capsys, args: list[str], expected: str, status: int = 2) -> None:
    capsys.readouterr()
    assert main(args) == status
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and expected in lines[0], lines


RESUME = ["fit", "--ckpt_path", "last", "--trainer.max_steps", "200", "--trainer.default_root_dir", "runs", *FAST]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.pop("loops"), "holds no training-loop state"),
        (lambda c: c.pop("optimizer_states"), "holds no optimizer state"),
        (lambda c: c.update(lr_schedulers=[{"garbage": 1}]), "learning-rate scheduler state is damaged"),
    ],
    ids=["no-loop-state", "weights-only", "garbage-scheduler"],
)
def test_a_checkpoint_that_cannot_continue_a_run_is_refused(run_copy, capsys, edit, expected):
    """Without loop state Lightning retrained from step 0 while reporting the checkpoint's step (and wrote the
    run's TensorBoard points twice); without optimizer or with garbage scheduler state it raised a traceback."""
    before = _edit_last(run_copy, edit)
    _refused(capsys, RESUME, expected)
    assert (_checkpoints(run_copy / "runs") / "last.ckpt").read_bytes() == before


def test_a_resume_without_its_config_keeps_its_batch_size_or_says_so(run_copy, capsys):
    """config.yaml deleted: the defaults (batch size 32) would silently replace the run's 64."""
    (run_copy / "runs" / "lightning_logs" / "version_0" / "config.yaml").unlink()
    _refused(capsys, RESUME, "trained with data.batch_size=64 but this command gives 32 (the run's")
    assert main([*RESUME, "--data.batch_size", "64"]) == 0
    assert torch.load(_checkpoints(run_copy / "runs") / "last.ckpt", weights_only=True)["global_step"] == 200


def test_printing_commands_refuse_a_closed_standard_output(run_copy, capsys, monkeypatch):
    """Python sets sys.stdout to None when descriptor 1 is closed (`>&-`): print() then writes nowhere."""
    monkeypatch.setattr(sys, "stdout", None)
    _refused(capsys, ["sample", "--root_dir", "runs", "-n", "5"], "standard output is closed: sample prints")
    _refused(capsys, ["validate", "--ckpt_path", "last", "--trainer.default_root_dir", "runs"], "standard output")


@pytest.mark.slow
def test_sample_with_standard_output_closed_fails_in_one_line(run_copy):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = f"'{sys.executable}' -m mm_lightning.cli sample --root_dir runs -n 5 >&-"
    proc = subprocess.run(
        cmd, shell=True, cwd=run_copy, env=env, capture_output=False, stderr=subprocess.PIPE, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _lines(proc.stderr) == [
        "error: standard output is closed: sample prints its results there; give it a file or pipe"
    ]


def test_names_from_a_vocabulary_with_escape_characters_are_escaped(run_copy, capsys):
    """A crafted checkpoint whose vocabulary holds ESC/BEL: the names must not drive the terminal."""

    def edit(c):
        c["hyper_parameters"]["net"]["vocab"] = (
            c["hyper_parameters"]["net"]["vocab"].replace("a", "\x1b").replace("e", "\x07")
        )

    _edit_last(run_copy, edit)
    capsys.readouterr()
    assert main(["sample", "--root_dir", "runs", "-n", "50"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b" in out and "\\x07" in out  # shown, escaped
    assert len(out.splitlines()) == 50


# ------------------------------------------------------------------------------------------ one line for each


def _nan_weights(c):
    for value in c["state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))


@pytest.mark.parametrize(
    "setup, args, expected",
    [
        (None, ["fit", "--data.batch_size", "1", *FAST], "--data.batch_size 1 with BatchNorm"),
        ("root-is-file", ["fit", "--trainer.default_root_dir", "blocker", *FAST], "a file of that name"),
        ("logs-are-file", ["fit", "--trainer.default_root_dir", "blocker", *FAST], "a file of that name"),
        (None, ["sample", "--root_dir", "runs", "--seed", str(10**23)], "--seed must be a whole number from 0"),
        (None, ["sample", "--root_dir", "runs", "--temperature", "1e-320"], "not a probability distribution"),
        (_nan_weights, ["sample", "--root_dir", "runs"], "not a probability distribution"),
        (
            "bad-run-config",
            ["validate", "--ckpt_path", "last", "--trainer.default_root_dir", "runs"],
            "is not valid YAML",
        ),
    ],
    ids=[
        "batch-1-batchnorm",
        "root-is-file",
        "logs-are-file",
        "seed-10e23",
        "temperature-1e-320",
        "nan-weights",
        "bad-run-config",
    ],
)
def test_each_former_traceback_is_one_line(run_copy, capsys, setup, args, expected):
    if setup == "root-is-file":
        (run_copy / "blocker").write_text("")
    elif setup == "logs-are-file":
        (run_copy / "blocker").mkdir()
        (run_copy / "blocker" / "lightning_logs").write_text("")
    elif setup == "bad-run-config":
        (run_copy / "runs" / "lightning_logs" / "version_0" / "config.yaml").write_text("trainer: [unclosed\n")
    elif setup is not None:
        _edit_last(run_copy, setup)
    _refused(capsys, args, expected)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


EVERY_COMMAND = {  # each command pointed at the run (and, where it writes a file of its own, into it)
    "fit": ["fit", "--ckpt_path", "last", "--trainer.max_steps", "150", "--trainer.default_root_dir", "runs", *FAST],
    "validate": ["validate", "--ckpt_path", "last", "--trainer.default_root_dir", "runs"],
    "test": ["test", "--ckpt_path", "last", "--trainer.default_root_dir", "runs"],
    "predict": ["predict", "--ckpt_path", "last", "--trainer.default_root_dir", "runs", "--data.num_samples", "3"],
    "sample": ["sample", "--root_dir", "runs", "-n", "3"],
    "diagnose": ["diagnose", *SMALL, "--save_figures", "runs/figures"],
    "fold-batchnorm": ["fold-batchnorm", "--root_dir", "runs", "--out", "runs/folded.ckpt"],
}
MUST_FAIL = {
    "read-only": {"fit", "validate", "test", "diagnose", "fold-batchnorm"},
    "full": {"fit", "diagnose", "fold-batchnorm"},
}


@contextlib.contextmanager
def _read_only(path: Path):
    """The run read-only for everyone, root included: a read-only bind mount (root ignores permission bits)."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount: cannot make a directory read-only")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _file_size_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # a checkpoint (17 KB) or a figure no longer fits


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["read-only", "full"])
def test_every_command_against_a_read_only_run_and_a_full_disk(run_copy, condition):
    """Each command: it succeeds, or says why not in one line with exit 2; never a traceback; the run's
    checkpoints are as they were."""
    runs = run_copy / "runs"
    checkpoints = {k: v for k, v in _tree(runs).items() if k.endswith(".ckpt")}
    with _read_only(runs) if condition == "read-only" else contextlib.nullcontext():
        for name, args in EVERY_COMMAND.items():
            limit = _file_size_limit if condition == "full" else None
            proc = run_cli(args, run_copy, check=False, preexec_fn=limit)
            where = f"{name} ({condition}): exit {proc.returncode}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, where
            lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
            assert proc.returncode in (0, 2) and len(lines) == (proc.returncode == 2), where
            assert (name in MUST_FAIL[condition]) <= (proc.returncode == 2), where
    after = {k: v for k, v in _tree(runs).items() if k.endswith(".ckpt") and k in checkpoints}
    assert after == checkpoints


# --------------------------------------------------------------------------------------------------------- scale


def _lecture_windows(words, vocab, block_size):
    """The lecture's build_dataset loop, written out here: the independent computation to check against."""
    stoi = {c: i for i, c in enumerate(vocab)}
    xs, ys = [], []
    for word in words:
        context = [0] * block_size
        for ch in word + ".":
            xs.append(context)
            ys.append(stoi[ch])
            context = context[1:] + [stoi[ch]]
    return torch.tensor(xs, dtype=torch.long).view(-1, block_size), torch.tensor(ys, dtype=torch.long)


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_vectorised_windows_are_the_lectures(names_file, block_size):
    from mm_lightning.data import build_vocab, build_windows, read_words

    for words in (read_words(names_file)[:5000], ["é", "zß", "a", "émile"]):
        vocab = build_vocab(words)
        x, y = build_windows(words, vocab, block_size)
        ex, ey = _lecture_windows(words, vocab, block_size)
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_names_file_too_large_for_memory_is_refused_before_building(run_copy, capsys, monkeypatch):
    import mm_lightning.data as data

    # 20 MiB: names.txt x 4 needs ~34 MiB (2 MiB stored, ~32 MiB of int64 index temporaries while building)
    monkeypatch.setattr(data, "_available_memory", lambda: 20 << 20)
    (run_copy / "more.txt").write_text((run_copy / "data" / "names.txt").read_text() * 4)
    examples = sum(len(word) + 1 for word in (run_copy / "more.txt").read_text().split())  # each character + end
    _refused(capsys, ["fit", "--data.path", "more.txt", *FAST], f"gives {examples:,} examples: building them needs ~")
    assert not (run_copy / "lightning_logs").exists()  # refused before any run directory


_OUT_OF_MEMORY = """
import resource, sys
from mm_lightning.data import NamesDataModule
from mm_lightning.errors import UsageError
address_space = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (address_space + (32 << 20), resource.RLIM_INFINITY))  # 32 MiB more
try:
    NamesDataModule(sys.argv[1]).setup()
except UsageError as e:
    print(e)
"""


@pytest.mark.slow
def test_running_out_of_memory_on_a_names_file_advises_a_smaller_file(tmp_path, names_file):
    """A real allocation failure while a names file is read and its examples stored (an address-space limit 32 MiB
    above what the imports took; the available-memory check passes): the line names --data.path, the setting that
    matters, not the CLI's generic advice to lower --data.batch_size."""
    big = tmp_path / "big.txt"
    big.write_text(names_file.read_text() * 20)  # 4.5 MB: storing it needs ~180 MB of int64 index temporaries
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY, str(big)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"out of memory reading data file {big} (4 MiB) and storing its examples; "), proc
    assert "use a smaller --data.path file" in proc.stdout and "batch_size" not in proc.stdout


def test_the_deletion_guard_still_overrides_lightnings_method():
    """RunCheckpoint._remove_checkpoint re-checks a path before Lightning deletes it: a private ModelCheckpoint
    method; if a Lightning upgrade renames it, the guard would silently stop guarding (the state filter remains)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mm_lightning.runs import RunCheckpoint

    assert "_remove_checkpoint" in vars(ModelCheckpoint) and "_remove_checkpoint" in vars(RunCheckpoint)


@pytest.mark.parametrize(
    "content",
    [
        b"anna\nbob\r\ncarl\rdan\n\n  eve \n\tfay\t\n",
        b"a\nbo\r\nx\r\rmary ann\nyz",
        "\ufeffanna\nbob\n".encode(),
        b"a\x0bb\nc\x0cd\n",
        b"anna\nmr.smith\n",
        b"anna\nbo\tb\n",
        b"anna\n" + b"x" * 5000 + b"\n",
        b"\n \n",
        "\u00e9mile\nanna\n".encode(),
    ],
    ids=["line-breaks", "short-words", "bom", "vt-ff", "boundary", "control", "long", "blank", "non-ascii"],
)
def test_reading_a_plain_ascii_file_at_once_gives_what_the_line_loop_gives(tmp_path, monkeypatch, content):
    """read_words' whole-list path for ASCII files (a large file read in seconds, not a minute): the same words, and
    the same refusal (from the line loop, which names the line), as its per-line loop."""
    import mm_lightning.data as data

    path = tmp_path / "words.txt"
    path.write_bytes(content)
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(data, "_ascii_corpus", lambda raw: None)
        try:
            results.append(data.read_words(path))
        except data.UsageError as e:
            results.append(str(e))
    assert results[0] == results[1]

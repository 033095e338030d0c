"""The benchmark command end to end, at a tiny size: it runs every variant and prints the table it promises."""

import json
import re
import subprocess
import sys
from functools import partial

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.slow
def test_bench_prints_per_repeat_ratios_and_writes_json(tmp_path, names_file):
    out = tmp_path / "bench.json"
    args = ["--steps", "30", "--repeats", "2", "--sizes", "small", "--device", "cpu", "--data_path", str(names_file)]
    args += ["--json", str(out), "--no_compile"]  # the compiled rows: tests/test_compile.py (slow tier)
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {
        "lecture loop",
        "lecture loop, 1 thread",
        "fit (defaults)",
        "fit, no diagnostics",
        "fit, plain Lightning loop",
        "diagnostics cost",
        "eval, whole val split",
    }
    assert rows["lecture loop"]["ratio"] == 1.0 and rows["lecture loop"]["spread"] == 0.0
    fit = rows["fit (defaults)"]
    assert fit["steps_per_s"] > 0 and len(fit["per_repeat"]) == 2 and fit["ratio"] > 0
    assert rows["eval, whole val split"]["steps"] == 22655  # examples, the whole split
    for what in rows:
        assert f"| {what} |" in proc.stdout


def test_bench_refuses_an_unknown_size(capsys):
    from mm_lightning.bench import main  # in-process: the refusal is tested, not the interpreter's start

    with pytest.raises(SystemExit) as exit_:  # argparse's error: what the process exits with
        main(["--sizes", "huge"])
    assert exit_.value.code == 2
    assert "unknown size 'huge'" in capsys.readouterr().err


def test_bench_without_the_names_file_offline_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from mm_lightning import data
    from mm_lightning.bench import main

    monkeypatch.chdir(tmp_path)  # no data/names.txt here
    monkeypatch.setattr(data, "NAMES_URL", "http://127.0.0.1:9/names.txt")  # nothing listens on port 9: offline
    assert main(["--sizes", "small", "--steps", "10", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data/names.txt is missing and downloading"), err
    assert err[0].endswith("copy names.txt to data/names.txt or pass --data_path FILE"), err
    assert not (tmp_path / "data" / "names.txt").exists()


@pytest.mark.slow
def test_bench_measures_the_diagnostics_cost_inside_a_run(names_file):
    args = ["--blocks", "1", "--steps", "4000", "--data_path", str(names_file)]
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on/off in alternating 1000-step blocks, 1 runs:" in proc.stdout
    cost = float(proc.stdout.split("median ")[1].split("%")[0])
    assert -50 < cost < 50  # a measured percentage, not a placeholder


@pytest.mark.slow
def test_bench_measures_the_callback_on_a_short_demo_fit():
    args = ["--short_run", "30", "--repeats", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = [float(x) for x in proc.stdout.split("per repeat ")[1].splitlines()[0].split(", ")]
    # each ratio is the one its repeat measured: with / without, from the times that repeat printed (a 30-step fit
    # lasts ~0.3 s, so under load the ratio itself can be anything: its value is the benchmark's business, not this
    # test's)
    repeats = re.findall(r"repeat \d+: without ([\d.]+) s, with ([\d.]+) s, ratio ([\d.]+)", proc.stdout)
    assert len(ratios) == len(repeats) == 2, proc.stdout
    for without, with_, ratio in repeats:
        assert float(without) > 0 and float(with_) > 0
        w, v, r = float(without), float(with_), float(ratio)
        rounding = (v / w) * (0.005 / w + 0.005 / v) + 0.0005  # the times are printed to 0.01 s, the ratio to 0.001
        assert abs(r - v / w) <= rounding, (without, with_, ratio)
    assert sorted(ratios) == sorted(float(r) for _, _, r in repeats)
    share = float(proc.stdout.split("time inside the callback's hooks: median ")[1].split("%")[0])
    assert 0 < share < 100


@pytest.mark.slow
def test_bench_measures_the_folded_networks_eval_speed(names_file):
    args = ["--fold", "--repeats", "2", "--data_path", str(names_file), "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = float(proc.stdout.split("median x")[1])
    assert 0.2 < ratio < 20  # a measured ratio, not a placeholder


def test_marginal_rate_is_the_step_difference_over_the_time_difference_within_each_repeat(capsys):
    from mm_lightning.bench import format_table
    from mm_lightning.bench_marginal import marginal_rates, marginal_rows

    # wall seconds each (variant, steps) reports, call after call: an untimed warm-up run at N1 first (its 99 s
    # must count nowhere), then a run per length and repeat; start-up differs between variants and repeats
    times = {
        ("loop", 2000): [99.0, 1.5, 1.25], ("loop", 8000): [4.5, 3.25],
        ("fit (defaults)", 2000): [99.0, 6.0, 5.0], ("fit (defaults)", 8000): [10.0, 10.0],
        ("fit, no diagnostics", 2000): [99.0, 5.0, 4.0], ("fit, no diagnostics", 8000): [8.75, 8.0],
    }  # fmt: skip
    calls = []

    def measured(name):
        def run(steps):
            calls.append((name, steps))
            return times[name, steps][calls.count((name, steps)) - 1]

        return run

    runs = {name: measured(name) for name in ("loop", "fit (defaults)", "fit, no diagnostics")}
    rates, one_off = marginal_rates(runs, 2000, 8000, repeats=2)
    jobs = [(name, n) for name in runs for n in (2000, 8000)]
    # every variant once untimed, then at both lengths, the order reversed in the second repeat
    assert calls == [(name, 2000) for name in runs] + jobs + jobs[::-1]
    times = {(name, n, r): times[name, n][r + (n == 2000)] for name, n in times for r in (0, 1)}
    rate = {(name, r): 6000 / (times[name, 8000, r] - times[name, 2000, r]) for name in runs for r in (0, 1)}
    assert rates == {name: [rate[name, 0], rate[name, 1]] for name in runs}
    assert rates["loop"] == [2000.0, 3000.0] and rates["fit (defaults)"] == [1500.0, 1200.0]
    assert one_off["fit (defaults)"] == [6.0 - 2000 / 1500, 5.0 - 2000 / 1200]  # beyond N1 steps at that rate

    row = {"size": "small", "batch": 32, "hidden": 100, "device": "cpu", "steps": 6000}
    rows = {r["what"]: r for r in marginal_rows(rates, one_off, "loop", 2000, 8000, row)}
    fit = rows["fit (defaults), marginal 2000→8000"]
    assert fit["per_repeat"] == [1500 / 2000, 1200 / 3000]  # against the loop of the same repeat, never across
    assert fit["ratio"] == (0.75 + 0.4) / 2 and fit["spread"] == 0.75 - 0.4
    assert fit["steps_per_s"] == 1350.0
    assert rows["loop, marginal 2000→8000"]["ratio"] == 1.0
    cost = rows["diagnostics cost, marginal 2000→8000"]
    assert cost["per_repeat"] == [1600 / 1500 - 1, 1500 / 1200 - 1]  # no diagnostics' rate over fit's, per repeat
    table = format_table(list(rows.values()))
    assert "| fit (defaults), marginal 2000→8000 | 1,350 | 0.57x | 0.35 |" in table


def test_marginal_rate_says_so_when_the_longer_run_was_not_slower(capsys):
    from mm_lightning.bench import format_table
    from mm_lightning.bench_marginal import marginal_rates, marginal_rows

    times = {("loop", 200): 1.0, ("loop", 400): 1.2, ("fit (defaults)", 200): 3.0, ("fit (defaults)", 400): 2.9}
    # (the warm-up runs at 200 report the same times: only the timed runs' are checked)
    rates, one_off = marginal_rates(
        {name: partial(lambda n, name: times[name, n], name=name) for name in ("loop", "fit (defaults)")}, 200, 400, 1
    )
    assert "fit (defaults): 3.000 s, 2.900 s: no rate" in capsys.readouterr().err
    row = {"size": "small", "batch": 32, "hidden": 100, "device": "cpu", "steps": 200}
    rows = marginal_rows(rates, one_off, "loop", 200, 400, row)
    assert "| fit (defaults), marginal 200→400: no rate (use longer runs) |  |  |" in format_table(rows)


@pytest.mark.parametrize(
    "given, says",
    [
        ("8000,2000", "N1 must be at least 1 and less than N2"),
        ("5", "expected two step counts, got 1"),
        ("2000,8k", "not whole numbers"),
        ("0.5,2", "not whole numbers"),
    ],
)
def test_bench_refuses_bad_marginal_lengths_in_one_line_before_any_work(given, says, tmp_path, monkeypatch, capsys):
    from mm_lightning import bench

    def work(*args, **kwargs):
        raise AssertionError("work started")

    for name in ("run", "marginal", "download_names", "fold_speedup", "short_run", "diagnostics_blocks"):
        monkeypatch.setattr(bench, name, work)
    monkeypatch.chdir(tmp_path)  # no data/names.txt here: the names file is not looked for either
    assert bench.main(["--marginal", given, "--sizes", "small"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --marginal {given!r}: {says}"), err
    assert err[0].endswith("give two step counts N1,N2 with 0 < N1 < N2, e.g. --marginal 2000,8000"), err


@pytest.mark.slow
def test_bench_marginal_runs_every_variant_at_both_lengths_and_prints_the_rows(tmp_path, names_file):
    out = tmp_path / "bench.json"
    args = ["--marginal", "200,400", "--repeats", "1", "--no_compile", "--sizes", "small", "--device", "cpu"]
    args += ["--data_path", str(names_file), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mm_lightning.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each run's two wall times, as measured (under load 200 steps' worth may drown in noise: then "no rate")
    runs = re.findall(r"\] (.+): ([\d.]+) s, ([\d.]+) s: (?:([\d,]+) steps/s|no rate)", proc.stderr)
    assert [name for name, *_ in runs] == ["lecture loop, 1 thread", "fit (defaults)", "fit, no diagnostics"]
    assert proc.stderr.count("[small warm-up]") == 3  # one untimed run of each variant first
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    for name, t1, t2, rate in runs:
        assert float(t1) > 0 and float(t2) > 0
        what = f"{name}, marginal 200→400"
        if not rate:
            assert f"| {what}: no rate (use longer runs) |" in proc.stdout
            continue
        low, high = float(t2) - float(t1) - 0.001, float(t2) - float(t1) + 0.001  # the times are printed to 1 ms
        assert 200 / high - 0.5 <= float(rate.replace(",", "")) <= 200 / max(low, 1e-9) + 0.5, (t1, t2, rate)
        assert rows[what]["steps_per_s"] == pytest.approx(float(rate.replace(",", "")), abs=0.5)
        assert f"| {what} | {rate} |" in proc.stdout
    assert "marginal rates: (N2-N1)/(T2-T1) of whole runs of 200 and 400 steps" in proc.stdout


class _Trainer:
    """What Stopwatch reads of a trainer, counting the reads: its hooks run inside every step it times."""

    def __init__(self, device: str, max_steps: int):
        self.reads = {"global_step": 0, "root_device": 0}
        self.max_steps, self.step, self.device = max_steps, 0, device
        self.strategy = self

    @property
    def global_step(self):
        self.reads["global_step"] += 1
        return self.step

    @property
    def root_device(self):
        self.reads["root_device"] += 1
        return torch.device(self.device)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stopwatch_costs_a_step_no_trainer_lookups_and_no_device_wait(device, monkeypatch):
    from mm_lightning import bench

    clock, syncs = iter(range(1, 10_000)), []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))  # one tick a read
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: syncs.append(trainer.step))
    trainer, watch = _Trainer(device, max_steps=1000), bench.Stopwatch(warm_up=100)
    watch.on_train_start(trainer, None)
    for step in range(1000):
        watch.on_train_batch_start(trainer, None, None, step)
        trainer.step = step + 1
        watch.on_train_batch_end(trainer, None, None, None, step)
    watch.on_train_end(trainer, None)
    assert trainer.reads["root_device"] == 1 and trainer.reads["global_step"] == 5, (
        trainer.reads
    )  # start 2, warm 1, end 2
    # the window: from the batch at step 100 (tick 102: the start, 100 batch ends) to step 1000's end (tick 1002)
    assert watch.warm == 102 and watch.last == 1002 and watch.steps == 900 and watch.steps_per_s == 900 / 900
    # on CUDA the device is waited for at the window's ends only (and the run's), never every step
    assert syncs == ([0, 100, 1000, 1000] if device == "cuda" else [])

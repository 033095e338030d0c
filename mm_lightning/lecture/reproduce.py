"""Reproduce the lecture's loss table: train each config with the real CLI, evaluate train and val over the whole
splits (BatchNorm in eval mode, running statistics), and write a CSV and a Markdown table beside the lecture's.

Run: python -m mm_lightning.reproduce configs/lecture/*.yaml [--out reproduce] [--jobs N] [--max_steps N]

Runs go in parallel (one process each; on a GPU when there is one). A run that was interrupted continues from its
last checkpoint (`fit --ckpt_path last`) and a finished one is not trained again, so the command can be re-run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from mm_lightning.data import NamesDataModule
from mm_lightning.errors import UsageError
from mm_lightning.runs import checkpoint_net, find_last, load_checkpoint
from mm_lightning.threads import one_thread_if_small

# makemore_part3_bn.ipynb's loss log, (train, val), as the lecture reports it
LECTURE = {
    "original": (2.1245, 2.1682),
    "fix_softmax": (2.07, 2.13),
    "fix_tanh": (2.0356, 2.1027),
    "kaiming": (2.0377, 2.1070),
    "batchnorm": (2.0668, 2.1048),
    # the notebook-exact configs: the notebook's stored outputs, cell 10 and cell 19, as it prints them
    "notebook_batchnorm": (2.0674145221710205, 2.1056840419769287),
    "notebook_deep": (2.4002976417541504, 2.3982467651367188),
}
# cell 7's printout: the minibatch loss at steps 0, 10000, ..., 190000 of the notebook's single-layer BatchNorm run
NOTEBOOK_CURVES = {
    "notebook_batchnorm": [3.3239, 2.0322, 2.5675, 2.0125, 2.2446, 1.8897, 2.0785, 2.3681, 2.2918, 2.0238]
    + [2.3673, 2.3132, 1.6414, 1.9311, 2.2231, 2.0027, 2.0997, 2.4949, 2.0199, 2.1707],
}
CURVE_EVERY = 10_000


@dataclass
class Result:
    config: str
    steps: int
    initial_loss: float
    train: float
    val: float
    lecture_train: float | None
    lecture_val: float | None
    minutes: float

    @property
    def deltas(self) -> tuple[float | None, float | None]:
        if self.lecture_train is None:
            return None, None
        return self.train - self.lecture_train, self.val - self.lecture_val


@torch.no_grad()
def evaluate(checkpoint: Path, data_path: str | None = None) -> tuple[int, dict[str, float]]:
    """The checkpoint's step, and the loss over each whole split, the network in eval mode (BatchNorm uses its
    running statistics)."""
    ckpt = load_checkpoint(checkpoint)
    net = checkpoint_net(ckpt).eval()
    config = net.config
    data = dict(ckpt.get("datamodule_hyper_parameters") or {})
    dm = NamesDataModule(
        path=data_path or data.get("path", "data/names.txt"),
        block_size=config.block_size,
        split_seed=data.get("split_seed", 42),
    )
    if dm.vocab != config.vocab:
        raise UsageError(f"{checkpoint} was trained on another vocabulary than {dm.path}")
    dm.setup()
    # each split in one pass, as the notebook's split_loss: its mean is then the notebook's to the last bit
    with one_thread_if_small(net, min(map(len, dm.splits.values()))):  # whole splits: all threads
        losses = {}
        for split, examples in dm.splits.items():
            x, y = examples.tensors()  # the split as the lecture's int64 tensors
            losses[split] = F.cross_entropy(net(x), y).item()
    return int(ckpt["global_step"]), losses


def _fit_command(config: Path, root: Path, max_steps: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "mm_lightning.cli", "fit", "--config", str(config)]
    cmd += ["--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false"]
    if max_steps is not None:  # a shorter run: the learning-rate decay moves with it, keeping its shape
        spec = yaml.safe_load(config.read_text()) or {}
        full = (spec.get("trainer") or {}).get("max_steps", 200_000)
        # the module's own step decay, or the config's lr_scheduler (the notebook-exact configs' MultiStepLR)
        scheduler = ((spec.get("lr_scheduler") or {}).get("init_args") or {}).get("milestones")
        milestones = scheduler or (spec.get("model") or {}).get("milestones", [150_000])
        scaled = [max(1, round(m * max_steps / full)) for m in milestones]
        option = "--lr_scheduler.init_args.milestones" if scheduler else "--model.milestones"
        cmd += ["--trainer.max_steps", str(max_steps), option, str(scaled)]
    last = root / "lightning_logs"
    if any(last.glob("version_*/checkpoints/last.ckpt")):
        cmd += ["--ckpt_path", "last"]  # continue an interrupted run (a finished one stops at once)
    return cmd


def sampled_losses(run_dir: Path) -> dict[int, float]:
    """The diagnostics' sampled/loss: the loss of each sampled step's minibatch (train/loss is a running mean)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("sampled/loss")} if "sampled/loss" in acc.Tags()["scalars"] else {}


def run(configs: list[Path], out: Path, jobs: int, max_steps: int | None, data_path: str | None) -> list[Result]:
    out.mkdir(parents=True, exist_ok=True)
    names = [c.stem for c in configs]
    if len(set(names)) != len(names):
        raise UsageError("two configs share a file name; their runs would share a directory")
    env = dict(os.environ)
    if jobs > 1 and not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"  # one core per run: several runs in parallel without oversubscription
    pending = list(zip(configs, names))
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    minutes: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < jobs:
            config, name = pending.pop(0)
            cmd = _fit_command(config, out / name, max_steps)
            if data_path:
                cmd += ["--data.path", data_path]
            log = open(out / f"{name}.log", "a")  # noqa: SIM115 - closed with the process below
            print(f"[reproduce] {name}: {' '.join(cmd[2:])}", flush=True)
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.monotonic())
        time.sleep(1)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                minutes[name] = (time.monotonic() - start) / 60
                if proc.returncode != 0:
                    raise UsageError(f"training {name} failed (exit {proc.returncode}); see {out / (name + '.log')}")
                print(f"[reproduce] {name}: done in {minutes[name]:.1f} min", flush=True)
    results = []
    for name in names:
        last = find_last(out / name / "lightning_logs")
        steps, losses = evaluate(last, data_path)
        lecture = LECTURE.get(name, (None, None))
        sampled = sampled_losses(last.parent.parent)
        if name in NOTEBOOK_CURVES and max_steps is None:  # (a shortened run has another learning-rate schedule)
            write_curve(name, NOTEBOOK_CURVES[name], sampled, out)
        results.append(
            Result(
                name,
                steps,
                sampled.get(0, math.nan),
                losses["train"],
                losses["val"],
                *lecture,
                round(minutes.get(name, 0.0), 1),
            )
        )
    shortened = None
    if max_steps is not None:
        shortened = (
            f"Runs shortened to {max_steps} steps (--max_steps; the learning-rate decay scaled along): the lecture's "
            "columns are its full-length runs, so the deltas only show the way to them."
        )
    write_tables(results, out, shortened)
    return results


def write_tables(results: list[Result], out: Path, note: str | None = None) -> None:
    order = list(LECTURE)  # the lecture's steps in the lecture's order, then the rest as given
    results = sorted(results, key=lambda r: order.index(r.config) if r.config in order else len(order))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    f4 = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    fd = lambda v: "" if v is None else f"{v:+.4f}"  # noqa: E731
    lines = [
        "| config | steps | loss at step 0 | train | val | lecture train | lecture val | Δ train | Δ val |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        dt, dv = r.deltas
        lines.append(
            f"| {r.config} | {r.steps} | {r.initial_loss:.4f} | {r.train:.4f} | {r.val:.4f} | {f4(r.lecture_train)} "
            f"| {f4(r.lecture_val)} | {fd(dt)} | {fd(dv)} |"
        )
    if note:
        lines += ["", note]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_curve(name: str, notebook: list[float], sampled: dict[int, float], out: Path) -> None:
    """The run's minibatch loss every CURVE_EVERY steps beside the notebook's printout (cell 7)."""
    lines = [f"| {name}: step | notebook | this run |", "| ---: | ---: | ---: |"]
    for i, want in enumerate(notebook):
        got = sampled.get(i * CURVE_EVERY)
        lines.append(f"| {i * CURVE_EVERY} | {want:.4f} | {'' if got is None else f'{got:.4f}'} |")
    (out / f"{name}_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_lightning.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="YAML configs, e.g. configs/lecture/*.yaml")
    parser.add_argument("--out", type=Path, default=Path("reproduce"), help="where runs and tables go")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: one per CPU core)")
    parser.add_argument("--max_steps", type=int, default=None, help="shorter runs; the LR decay is scaled along")
    parser.add_argument("--data_path", default=None, help="names file (default: each config's data.path)")
    a = parser.parse_args(argv)
    try:
        for c in a.configs:
            if not c.is_file():
                raise UsageError(f"config {c} does not exist")
        if a.max_steps is not None and a.max_steps < 1:
            raise UsageError(f"--max_steps must be at least 1, got {a.max_steps}")
        jobs = a.jobs or max(1, min(len(a.configs), os.cpu_count() or 1))
        run(a.configs, a.out, jobs, a.max_steps, a.data_path)
    except UsageError as e:  # the data's line names fit's option; this command's is --data_path
        print(f"error: {str(e).replace('--data.path', '--data_path')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

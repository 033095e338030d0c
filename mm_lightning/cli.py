"""The command line: python -m mm_lightning.cli {fit,validate,test,predict,sample,download} ...

fit/validate/test/predict are LightningCLI subcommands (configs in configs/, overrides such as
--trainer.max_steps 400 --model.lr 0.05 --data.batch_size 64). On top of plain LightningCLI:
- `--ckpt_path last` resumes the most recently written run in its own directory, so TensorBoard curves continue
  (plain Lightning looks for `last` in a new version folder and silently starts over: Lightning issue 18524). The
  run's config.yaml is the base config, and settings that contradict the checkpoint are refused, not ignored.
- a new run claims its version directory atomically: runs started together never share one;
- checkpoints are written atomically and read with torch.load(weights_only=True);
- bad input prints one line and exits with status 2 (add --debug for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import sys
import threading
from pathlib import Path

import torch
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mm_lightning import preflight, signals
from mm_lightning.data import DEFAULT_PATH, NAMES_SHA256, download_names
from mm_lightning.diagnostics import DiagnosticsConfigError
from mm_lightning.errors import NothingToDo, UsageError
from mm_lightning.lightning_cli import MakemoreCLI, _is_rank_zero, _quiet_noise, printable
from mm_lightning.model import generate
from mm_lightning.module import NonFiniteLossError
from mm_lightning.resume import _refuse_changed_model  # noqa: F401 (where the tests and users found it)
from mm_lightning.runs import (
    StopOnSignal,
    checkpoint_net,
    discard_empty_claims,
    find_last,
    load_checkpoint,
    runs_dir,
    unlock_runs,
)
from mm_lightning.threads import one_thread_if_small

# -------------------------------------------------------------------------------------------- other commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message}; see `python -m mm_lightning.cli {self.prog.split()[-1]} --help`")


SAMPLE_CHUNK = 10_000  # names generated at once by `sample`


def sample_command(args: list[str]) -> None:
    parser = _Parser(prog="mm_lightning.cli sample", description="Print names sampled from a checkpoint.")
    parser.add_argument("--ckpt_path", default="last", help="a .ckpt file, or 'last': the newest run's last.ckpt")
    parser.add_argument("--root_dir", default=".", help="where lightning_logs/ is (fit's --trainer.default_root_dir)")
    parser.add_argument("-n", "--num_samples", type=int, default=20, help="how many names")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; lower is safer)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument(
        "--one_at_a_time",
        action="store_true",
        help="one name after another, as the lecture's notebook samples (slower); with --seed 2147483657, its names",
    )
    a = parser.parse_args(args)
    if a.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {a.num_samples}")
    if not a.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {a.temperature}; 1.0 samples the model as trained")
    if not 0 <= a.seed < 2**64:  # torch.Generator.manual_seed's range
        raise UsageError(f"--seed must be a whole number from 0 to 2**64 - 1, got {a.seed}")
    runs = runs_dir(a.root_dir)
    if a.ckpt_path == "last" and not any(runs.glob("version_*/checkpoints/last.ckpt")):
        raise UsageError(
            f"no trained run to sample from under {runs}: train one first (python -m mm_lightning.cli fit), "
            "or pass --ckpt_path FILE (--root_dir DIR if the runs are elsewhere)"
        )
    path = find_last(runs) if a.ckpt_path == "last" else Path(a.ckpt_path)
    checkpoint = load_checkpoint(path)
    net = checkpoint_net(checkpoint)  # (load_checkpoint refuses weights that do not fit their model)
    # on stderr: stdout holds only the names, for a pipe
    print(f"sample: {path} (step {int(checkpoint.get('global_step', 0))})", file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(a.seed)
    rows = 1 if a.one_at_a_time else min(SAMPLE_CHUNK, a.num_samples)  # names computed at once: fit's thread rule
    draw = None
    if a.one_at_a_time:  # the lecture kit's order of draws
        from mm_lightning.lecture.sampling import words_one_at_a_time as draw
    with one_thread_if_small(net, rows):
        for start in range(0, a.num_samples, SAMPLE_CHUNK):  # in chunks: memory stays flat however many are asked
            count = min(SAMPLE_CHUNK, a.num_samples - start)
            for name in generate(net, count, a.temperature, generator, draw=draw):
                print(printable(name))


def download_command(args: list[str]) -> None:
    parser = _Parser(prog="mm_lightning.cli download", description="Fetch makemore's names.txt (sha256-checked).")
    parser.add_argument("--path", default=DEFAULT_PATH, help="where to write it")
    path = Path(parser.parse_args(args).path)
    if path.exists():
        print(f"{path} already exists; delete it to download again")
        return
    download_names(path)
    print(f"wrote {path} (sha256 {NAMES_SHA256[:12]}...)")


def diagnose_command(args: list[str]) -> int:
    from mm_lightning.diagnose import diagnose_command

    return diagnose_command(args)


def fold_batchnorm_command(args: list[str]) -> None:
    from mm_lightning.lecture.fold import fold_command

    fold_command(args, _Parser)


COMMANDS = {
    "sample": sample_command,
    "download": download_command,
    "diagnose": diagnose_command,
    "fold-batchnorm": fold_batchnorm_command,
}
USAGE = """usage: python -m mm_lightning.cli COMMAND [options]   (or: mm-lightning COMMAND [options])

  fit        train; --config configs/X.yaml, overrides like --trainer.max_steps 400 --model.lr 0.05;
             --ckpt_path last continues the most recent run in its own directory
  validate   val/loss of a checkpoint        (--ckpt_path last | FILE)
  test       test/loss of a checkpoint       (--ckpt_path last | FILE)
  predict    names generated through Lightning (--ckpt_path ..., --data.num_samples N)
  sample     names from a checkpoint, quickly (--num_samples 20 --temperature 1.0 --seed 42)
  diagnose   per-layer activation/gradient tables and health verdicts at init (or after --steps K)
  download   fetch makemore's names.txt into data/ (sha256-checked)
  fold-batchnorm  a checkpoint with every BatchNorm folded into its Linear (--ckpt_path last --out F.ckpt)

Every command takes --help; --debug shows the traceback of an error."""


COMMON_OPTIONS = """the options most runs need (every option follows, grouped by class, after this):
  --config FILE                   a YAML of options, e.g. configs/lecture/batchnorm.yaml (several: later wins)
  --ckpt_path last|FILE           fit: continue the newest run in its own directory; validate/test/predict:
                                  the checkpoint to read (its own model settings)
  --trainer.max_steps N           optimizer steps (default 200000, the lecture's run)
  --trainer.default_root_dir DIR  where lightning_logs/ goes (default .)
  --trainer.accelerator cpu|gpu   --trainer.devices N    --trainer.precision 32-true|bf16-mixed
  --model.lr LR                   SGD's learning rate (default 0.1; --model.milestones [150000] divides it by 10)
  --model.net.n_hidden N          units per hidden layer (default 100)   --model.net.n_layers N  (default 5)
  --model.net.batchnorm BOOL      BatchNorm after each hidden Linear     --model.net.gain G  (default 5/3)
  --data.path FILE                names, one per line (default data/names.txt)
  --data.batch_size N             minibatch size (default 32)
  --diagnostics.every_n_steps N   sample the lecture's diagnostics every N steps (0: off; default 100)
  --print_config                  print the full configuration as YAML and exit
"""
PRINTING_COMMANDS = ("sample", "predict", "validate", "test", "diagnose")  # their results go to standard output


def _one_line(error: Exception, argv: list[str]) -> str:
    """jsonargparse's multi-line parse errors, as one line that names the key and points at --help."""
    text = " ".join(str(error).split())
    text = re.sub(r'Parser key "([^"]+)": ', r"--\1: ", text)
    text = text.replace("Expected a typing.Literal", "expected one of ").replace("Expected a ", "expected ")
    text = re.sub(r"<class '(\w+)'>", r"\1", text).replace(". Got value:", ", got")
    # an argument of a class-path option (--model.net, --data): "--data: ... class_path 'X': --key: what" -> --data.key
    given = r"--([\w.]+): .*?Problem with given class_path '[\w.]+': --(\w+): (.*?)( - expected NoneType.*)?$"
    nested = re.match(given, text)
    if nested:
        text = f"--{nested[1]}.{nested[2]}: {nested[3]}"
    unknown = re.match(r"--(optimizer|lr_scheduler): - expected path but (\S+) either not accessible or invalid", text)
    if unknown:
        text = _unknown_class_line(unknown[1], unknown[2])
    # --lr_scheduler X without an argument X requires: jsonargparse lists every Union subtype and the whole Namespace
    required = re.match(
        r"--(optimizer|lr_scheduler): .*?class_path '([\w.]+)': the following arguments are "
        r"required: ([\w, ]+?) - ",
        text,
    )
    if required:
        key, cls, names = required[1], required[2].rsplit(".", 1)[-1], required[3].split(", ")
        needed = " ".join(f"--{key}.{n} VALUE" for n in names)
        text = f"--{key} {cls} needs {', '.join(names)}: add {needed}"
    # an argument no class takes: --optimizer.lr (or --lr_scheduler.gamma) with no --optimizer (--lr_scheduler)
    # class to take it, or one the class given (--optimizer AdamW, --model.net, --data) does not take
    option = re.match(r"--([\w.]+): .*?class_path '([\w.]+)': Option '(\w+)' is not accepted", text)
    if option:
        key, cls, name = option[1], option[2], option[3]
        optimizer_or_schedule = key in ("optimizer", "lr_scheduler")
        if optimizer_or_schedule and f"--{key}" not in [a.split("=")[0] for a in argv]:
            own = " (the module's own SGD takes --model.lr)" if key == "optimizer" else ""
            example = "SGD" if key == "optimizer" else "StepLR"
            text = f"--{key}.{name} needs --{key} CLASS first (e.g. --{key} {example}){own}"
        else:
            text = f"--{key}.{name}: {cls.rsplit('.', 1)[-1]} takes no argument {name!r}"
            text += _arguments_of(cls) if optimizer_or_schedule else _closest_argument(cls, name)
    choice = re.match(r"argument subcommand: invalid choice: '([^']*)'", text)
    if choice:
        import difflib

        commands = ["fit", "validate", "test", "predict", *COMMANDS]
        close = difflib.get_close_matches(choice[1], commands, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return (
            f"no command {choice[1]!r}; {hint}(one of {', '.join(commands)}; see `python -m mm_lightning.cli --help`)"
        )
    closest = getattr(error, "closest", None)  # MakemoreCLI's guess at a misspelt option
    if closest:
        text += f"; did you mean {closest}?"
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    return f"{text} (see `python -m mm_lightning.cli {command} --help`)".replace("  ", " ")


def _closest_argument(class_path: str, given: str) -> str:
    """ "; did you mean x?" for the argument of an importable class nearest `given`, else its arguments."""
    import difflib

    close = difflib.get_close_matches(given, _argument_names(class_path), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else _arguments_of(class_path)


def _argument_names(class_path: str) -> list[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p for p in parameters if p not in ("self", "params", "optimizer")]


def _arguments_of(class_path: str) -> str:
    """ "; its arguments: a, b, ..." for an importable class, else ""."""
    names = _argument_names(class_path)
    return f"; its arguments: {', '.join(names)}" if names else ""


def _unknown_class_line(key: str, given: str) -> str:
    """--optimizer / --lr_scheduler naming no class: the closest of torch's own (jsonargparse's words would list
    every Union subtype it tried)."""
    import difflib
    import inspect

    import torch

    if key == "optimizer":
        base, where, common = torch.optim.Optimizer, torch.optim, "SGD, AdamW, Adam"
    else:
        base, where, common = torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler, "StepLR, OneCycleLR"
    names = sorted(n for n, c in vars(where).items() if inspect.isclass(c) and issubclass(c, base) and c is not base)
    close = [n for n in names if n.lower() == given.lower()] or difflib.get_close_matches(given, names, n=1)
    if close:
        return f"--{key} {given}: no such class; did you mean {close[0]}?"
    return f"--{key} {given}: no such class; give one of {where.__name__} (e.g. {common}) or a class path (pkg.Class)"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _interrupted_line(e: signals.Interrupted, argv: list[str], stopper: StopOnSignal) -> str:
    """What a signal that stopped the command where it was leaves behind, in one line."""
    if argv[0] != "fit":
        return f"interrupted by {e.name}: {argv[0]} stopped before it finished"
    if not stopper.started:
        resumed = any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv)
        kept = "the checkpoint resumed from is as it was: run the same command again" if resumed else "run it again"
        return f"interrupted by {e.name} before the first step: no checkpoint written; {kept}"
    step = stopper.trainer_step()
    if stopper.ended:
        return f"interrupted by {e.name} after training ended at step {step}: its checkpoints are written"
    return (
        f"stopped at once by a second {e.name} at step {step}: no checkpoint at this step; the last one written "
        "stays (continue with `fit --ckpt_path last`)"
    )


def _class_path_help(command: str, key: str, class_path: str, more: str) -> str:
    """The options of a class-path argument (--model.net, --data) with their docstrings: the lecture kit's classes
    may replace the core's there, and jsonargparse lists such an argument's options only under --KEY.help CLASS."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            MakemoreCLI([command, f"--{key}.help", class_path])
    except SystemExit:
        pass
    text = said.getvalue()
    start = text.find(f"Help for --{key}.help")
    options = text[text.index("\n", start) :].strip("\n") if start >= 0 else ""
    name = class_path.rsplit(".", 1)[1]
    return f"--{key}.* ({name}; {more}: `{command} --{key}.help mm_lightning.lecture.{more.split()[-1]}`):\n{options}\n"


def main(argv: list[str] | None = None) -> int:
    _quiet_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("MM_LIGHTNING_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    # `--help` shows each MLPConfig field's docstring (the dataclass documents its fields under each one, as litgpt's).
    # Only then: finding those docstrings parses the source of every class the parser reads (Trainer's included),
    # ~80% of building the parser, which every command pays at start.
    wants_help = any(a in ("-h", "--help") or a.endswith(".help") for a in argv)  # (--model.net.help CLASS too)
    set_parsing_settings(docstring_parse_attribute_docstrings=wants_help)
    failed_threads: list[BaseException] = []  # a background writer's failure (TensorBoard's), said in one line
    previous_hook, threading.excepthook = threading.excepthook, lambda args: failed_threads.append(args.exc_value)
    try:
        status = _main(argv, debug, failed_threads)
    finally:
        threading.excepthook = previous_hook
    return status


def _main(argv: list[str], debug: bool, failed_threads: list[BaseException]) -> int:
    with signals.handled():  # from here to the end a signal gives 128 + signal and one line, never 0
        status = None
        try:
            try:
                status = _command(argv, debug)
            finally:
                signals.hold()  # the cleanup below must finish: a signal now is noted, and answered after it
                if status != 0:
                    discard_empty_claims()  # a command that failed before logging anything leaves no empty version_N
                unlock_runs()
        except signals.Interrupted as e:  # (between _command's own handling and the hold above)
            print(f"error: interrupted by {e.name} while finishing {argv[0]}", file=sys.stderr)
            return e.status
        if failed_threads and status == 0:  # (with another failure, its line already says what went wrong)
            error = failed_threads[0]
            if debug:
                raise error
            line = preflight.resource_error(error, argv[0]) or f"a background thread failed: {_first_line(error)}"
            print(f"error: {line}", file=sys.stderr)
            status = 2
        late = signals.held()
        if late is not None and status == 0:
            print(
                f"error: interrupted by {signals.NAMES[late]} as {argv[0]} finished (it had completed)", file=sys.stderr
            )
            return 128 + late
        return status


def _command(argv: list[str], debug: bool) -> int:
    """Run the command; bad input, and resource errors, as one line and exit status 2."""
    stopper = StopOnSignal()
    try:
        if sys.stdout is None and argv[0] in PRINTING_COMMANDS:  # `sample >&-`: print() would write nowhere, exit 0
            raise UsageError(f"standard output is closed: {argv[0]} prints its results there; give it a file or pipe")
        preflight.check_config_files(argv)
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:]) or 0
        if argv[0] in ("fit", "validate", "test", "predict") and {"-h", "--help"} & set(argv[1:]):
            print(f"usage: python -m mm_lightning.cli {argv[0]} [options]\n\n{COMMON_OPTIONS}", flush=True)
            print(_class_path_help(argv[0], "model.net", "mm_lightning.model.MLPConfig", "or NotebookMLPConfig"))
            print(_class_path_help(argv[0], "data", "mm_lightning.data.NamesDataModule", "or NotebookNamesDataModule"))
        interrupted = MakemoreCLI(argv, stop_on_signal=stopper).stop_on_signal
        if interrupted.message() is not None:
            print(f"error: {interrupted.message()}", file=sys.stderr)
            return 128 + interrupted.received
        return 0
    except signals.Interrupted as e:
        signals.hold()
        if debug:
            raise
        print(f"error: {_interrupted_line(e, argv, stopper)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:  # (signal handlers are only ours in the main thread)
        signals.hold()
        if debug:
            raise
        print(f"error: {_interrupted_line(signals.Interrupted(signal.SIGINT), argv, stopper)}", file=sys.stderr)
        return 128 + signal.SIGINT
    except SIGTERMException:  # several processes: Lightning stopped every rank at a batch end (exit 0 otherwise)
        signals.hold()
        print(
            "error: interrupted by SIGTERM: every process stopped at a batch end; continue from the last checkpoint "
            "written with `fit --ckpt_path last`",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except NothingToDo as e:  # 0: the run is where it was asked to be (a loop or reproduce continuing it is done)
        if _is_rank_zero():
            print(e, flush=True)
        return 0
    except (UsageError, MisconfigurationException) as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except DiagnosticsConfigError as e:  # it names its Python argument: the CLI's is --diagnostics.<argument>
        if debug:
            raise
        print(f"error: --diagnostics.{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ArgumentError as e:
        if debug:
            raise
        print(f"error: {_one_line(e, argv)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        if debug:
            raise
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `sample ... | head`: the reader has gone; stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE
    except Exception as e:  # memory, disk, permissions: one line naming what to change; anything else: a bug
        message = None if debug else preflight.resource_error(e, argv[0])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

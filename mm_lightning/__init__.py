"""mm_lightning: Karpathy's makemore part 3 (activations, gradients, BatchNorm) as a Lightning project."""

__version__ = "0.1.0"


def _is_cli_process() -> bool:
    """Whether this process is the command line (python -m mm_lightning.cli, or the mm-lightning script)."""
    import sys
    from pathlib import Path

    argv = getattr(sys, "orig_argv", [])
    as_module = any(a == "-m" and b == "mm_lightning.cli" for a, b in zip(argv, argv[1:]))
    return as_module or Path(sys.argv[0]).name == "mm-lightning"


if _is_cli_process():  # before torch and Lightning load (seconds): a signal then still exits 128 + signal, in one line
    from mm_lightning import signals

    signals.install_early()

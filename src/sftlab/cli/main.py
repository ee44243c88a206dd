"""`sftlab` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import os
import sys

# Only modules the interpreter has loaded before any of ours (os, sys) are imported here: a Ctrl-C while this
# module loads would escape main()'s handler and print a traceback, so the rest (even typing) loads inside it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

SUBCOMMANDS = [
    "train",
    "eval",
    "generate",
    "merge",
    "convert",
    "quickstart",
    "pipeline",
    "plan",
    "selftrain",
    "compare",
    "ui",
]


def build_parser() -> argparse.ArgumentParser:
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="sftlab", description="Supervised fine-tuning of pretrained transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"sftlab.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a Ctrl-C anywhere (start-up imports, model loading, training) exits 130 quietly."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _plain_warnings()
    _quiet_torchao_import()
    args = build_parser().parse_args(argv)
    import_libraries()
    from ..errors import SftlabError

    try:
        return int(args.func(args) or 0)
    except SftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that fills or a directory made read-only mid-run: the path, not a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def _plain_warnings() -> None:
    """sftlab's own warnings print as `warning: ...` lines, like its errors; other libraries' keep Python's form."""
    import warnings

    default = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if f"{os.sep}sftlab{os.sep}" in filename:
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


TORCHAO_KERNEL_LOAD = r"Failed to load \S*torchao[/\\]_C[^/\\]*\.so\b"
ENUM_CONSTANT_NOTE = (
    "is an Enum subclass and is now natively supported by torch.compile as an opaque value type"
)


def _quiet_torchao_import() -> None:
    """transformers imports torchao whenever it is installed (transformers/quantizers/quantizer_torchao.py), and
    torchao's import printed on every command: a WARNING per optional compiled kernel of its wheel that cannot load
    here ("Failed to load .../torchao/_C_mxfp8...so": a build for another Python or a CUDA architecture this
    machine lacks; sftlab calls none of them), logged at DEBUG instead; and torch pytree's note that registering an
    Enum as a constant (as torchao does) is deprecated, meant for torchao's authors, dropped. Every other message of
    those loggers passes unchanged."""
    import logging
    import re

    if getattr(_quiet_torchao_import, "done", False):  # main() may run many times in one process (tests)
        return
    _quiet_torchao_import.done = True  # type: ignore[attr-defined]
    kernel = re.compile(TORCHAO_KERNEL_LOAD)

    def demote(record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and kernel.match(record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True

    logging.getLogger("torchao").addFilter(demote)
    logging.getLogger("torch.utils._pytree").addFilter(lambda r: ENUM_CONSTANT_NOTE not in r.getMessage())


def import_libraries() -> None:
    """Import torch and transformers' model and tokenizer code with Ctrl-C as an immediate quiet exit (130). An
    interrupt inside numpy's or torch's C-extension start-up leaves them half-loaded, and transformers' lazy loader
    then reports a ModuleNotFoundError/RecursionError traceback, not a KeyboardInterrupt; nothing is written yet,
    so leaving at once loses nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum, frame):
        os.write(2, b"interrupted\n")
        os._exit(130)

    old = signal.signal(signal.SIGINT, leave)
    try:
        import torch  # noqa: F401
        from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, old)


if __name__ == "__main__":
    sys.exit(main())

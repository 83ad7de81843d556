"""The command layer's shared part: what every command file (python -m supermask.<command>) shares.

The command layer is the command files (train, imp, instability, compare, export, analyze, runs)
and this module, their common half: argparse with one-line errors and exit code 2 (Parser,
run_main), numeric flag types with their ranges (number), the flags made from the run
description's fields (add_fields, and list_type for a list of one field's values: a Field's range
becomes its flag's argparse type, so a bad value is a one-line error before anything is read or
written, and the range exists once, in supermask.desc; a config file's value is checked by the
same type, config_value), and the --device / --backend choice. Only command files import this
module and argparse; the library modules under supermask/ never do (tests/test_structure.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from . import desc
from .errors import DataError, UsageError

BACKENDS = ("auto", "torch", "cpu", "triton")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, for every option: also those without a help text,
    and not twice where the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        optional = bool(action.option_strings) or action.nargs in ("?", "*")  # a flag, or a positional with a default
        if not optional or "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)".strip()
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with code 2; --help
    shows every option's default (DefaultsHelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse prints no help line, hence no default, for an option without help text
        """argparse's add_argument; a flag without help text gets one that states its default."""
        if args and str(args[0]).startswith("-") and not kwargs.get("help"):
            kwargs["help"] = "(default: off)" if kwargs.get("action") == "store_true" else "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        """A bad flag: one line on stderr and exit code 2 (no usage block)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind=float, low=None, high=None, low_open=False, high_open=False, list_of=False):
    """An argparse type= for a numeric flag: parses kind (int or float), refuses nan and inf, and
    checks the range [low, high] (an open end with low_open / high_open; None: unbounded). With
    list_of, a comma-separated list of such numbers (a tuple). A bad value is argparse's one-line
    error, exit code 2, before anything runs.

        p.add_argument("--lr", type=number(float, 0, low_open=True))   # a finite number > 0
    """
    lo_sign, hi_sign = (">" if low_open else ">="), ("<" if high_open else "<=")
    if low is not None and high is not None:
        want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        want = f"{lo_sign} {low:g}"
    elif high is not None:
        want = f"{hi_sign} {high:g}"
    else:
        want = "finite"
    noun = "an integer" if kind is int else "a number"

    def one(text: str):
        try:
            value = kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} {want}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number {want}, got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"expected {noun} {want}, got {text!r}")
        return value

    def many(text: str):
        return tuple(one(v) for v in text.split(",") if v.strip())

    convert = many if list_of else one
    convert.__name__ = f"{kind.__name__}{'_list' if list_of else ''}"  # argparse names the type in errors
    return convert


def run_main(prog: str, main, argv=None, interrupted: str = "interrupted") -> int:
    """Call main(argv); turn UsageError (and data errors) into one line on stderr and exit 2.
    interrupted: what to print (after prog) on Ctrl-C, exit code 130. A closed stdout pipe
    (`... --json | head`) ends the command quietly with exit code 141."""
    try:
        return main(argv) or 0
    except (UsageError, DataError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever e holds
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left early (`| head`): what it read is what it wanted
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell tool killed by the closed pipe


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's flush at exit raises no BrokenPipeError again
    (Python's documented recipe, signal module: "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured): nothing to flush
        pass


def resolve_device(name: str) -> torch.device:
    """The torch.device for --device (auto: cuda when available). Raises UsageError for an unknown name or cuda
    without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible to torch")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _cpu_kernels_error() -> str | None:
    from . import cpu_kernels  # noqa: PLC0415

    return cpu_kernels.why_unavailable()


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' picks the Triton kernels on CUDA, the fused CPU kernels on the CPU when they build
    (a C compiler is there), and the reference path otherwise. All three give the same masks."""
    if name == "auto":
        if device.type == "cuda":
            return "triton" if _triton_available() else "torch"
        return "cpu" if _cpu_kernels_error() is None else "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise UsageError("--backend cpu runs on the CPU: pass --device cpu (or --backend triton on CUDA)")
        error = _cpu_kernels_error()
        if error is not None:
            raise UsageError(f"--backend cpu: {error}; use --backend torch (same results, slower)")
    if name == "triton":
        if not _triton_available():
            raise UsageError("--backend triton but Triton is not installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--backend triton needs a CUDA GPU; to run the kernels in Triton's interpreter "
                             "on the CPU (slow, for testing) set TRITON_INTERPRET=1 and pass --device cpu")
    return name


# ---------------------------------------------------------------------------------------------
# Flags made from the run description's fields (supermask.desc).

def field_type(f: desc.Field):
    """The argparse type= of a numeric field (None for a string or switch)."""
    if f.kind is tuple:
        return list_type(f)
    if f.kind in (int, float):
        return number(f.kind, f.low, f.high, f.low_open, f.high_open)
    return None


def list_type(f: desc.Field):
    """The argparse type= of a comma-separated list of f's values (a tuple, each checked as f's own
    flag checks one: its kind and range; a tuple field's items are integers), for a flag that takes
    several values of one field, e.g. compare's --ks from desc.K_FIELD:

        p.add_argument("--ks", type=list_type(desc.K_FIELD), default="0.1,0.5")   # each k in (0, 1]
    """
    return number(int if f.kind is tuple else f.kind, f.low, f.high, f.low_open, f.high_open, list_of=True)


def add_fields(p: argparse.ArgumentParser, fields, **override) -> None:
    """One flag per field (store_true for a bool); override: {name: {argparse keyword: value}}
    for a command whose flag differs (another default or help)."""
    for f in fields:
        kwargs = {"default": f.default, "help": f.help}
        if f.kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=field_type(f), choices=f.choices)
        kwargs.update(override.get(f.name, {}))
        p.add_argument(f.flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def add_model_args(p: argparse.ArgumentParser, **override) -> None:
    """--model, --width, --dataset, --data-dir, --val-size, --seed."""
    add_fields(p, desc.MODEL_FIELDS, **override)


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The training hyperparameters, then --device, --threads, --no-progress, --no-tensorboard, --workers."""
    add_fields(p, desc.TRAINING_FIELDS)
    add_fields(p, desc.RUNTIME_FIELDS)


def add_backend(p: argparse.ArgumentParser, help: str) -> None:
    """--backend: the mask implementation (cli.resolve_backend)."""
    p.add_argument("--backend", default="auto", choices=BACKENDS, help=help)


def config_value(action: argparse.Action, value, source: str):
    """A config file's value checked and converted as the flag's own would be; UsageError naming
    source and the flag when it is not valid."""
    if value is None:
        return None
    flag = action.option_strings[0] if action.option_strings else action.dest
    try:
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError
        elif action.type is not None and not isinstance(value, tuple):
            value = action.type(str(value))
        if action.choices is not None and value not in action.choices:
            raise ValueError
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UsageError(f"{source}: {value!r} is not a valid value for {flag}") from None
    return value

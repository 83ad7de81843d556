"""The command layer's flags, made from the run description's fields (supermask.desc).

A Field's range becomes its flag's argparse type (cli.number: finite, in range, integer where
integer), so a bad value is a one-line error before anything is read or written, and the range
exists once, in desc. A config file's value (train --config) is checked by the same type
(config_value).
"""
from __future__ import annotations

import argparse

from . import desc
from .cli import number
from .errors import UsageError

BACKENDS = ("auto", "torch", "cpu", "triton")


def field_type(f: desc.Field):
    """The argparse type= of a numeric field (None for a string or switch)."""
    if f.kind is tuple:
        return number(int, f.low, f.high, f.low_open, f.high_open, list_of=True)
    if f.kind in (int, float):
        return number(f.kind, f.low, f.high, f.low_open, f.high_open)
    return None


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

"""Error types with messages that name the problem and the fix."""

from __future__ import annotations

import argparse
import difflib
from typing import Iterable


class PsannError(Exception):
    """Base class for every error psann-lm raises on purpose."""


class ConfigError(PsannError, ValueError):
    """A configuration key, type or value is invalid."""


class DataError(PsannError, ValueError):
    """Input text or token data cannot be used."""


class CheckpointError(PsannError, RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt or incompatible."""


class TrainingError(PsannError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); says what to change."""


class StorageError(PsannError, OSError):
    """Disk full, no permission, or another OS failure while writing; names the path and the cause."""


class BusyError(PsannError, RuntimeError):
    """Another process holds the directory this one would write to."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown name: lists the valid ones and suggests the closest."""
    choices = sorted(choices)
    return f"unknown {what} '{name}'.{did_you_mean(name, choices)} Valid: {', '.join(choices)}."


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, so a bad count is a usage error naming its flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse

"""What the commands print besides their results: psann.lm's log lines on stderr, and argument
errors that name the closest subcommand or flag.

The library only logs (importing it adds a NullHandler, as libraries should); each command's
entry point calls `setup_logging()` to show the lines as `psann: message`. LOG_LEVEL=DEBUG (or
WARNING, ...) sets the level, as the earlier LM_training scripts did. Python users who want the
lines call it too, or configure the "psann.lm" logger themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .errors import did_you_mean

LOGGER = "psann.lm"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """Show psann.lm's INFO lines (or LOG_LEVEL's) on stderr; once per process, a no-op after."""
    logger = logging.getLogger(LOGGER)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("psann: %(message)s"))
    logger.addHandler(handler)
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    known = level in logging.getLevelNamesMapping()
    logger.setLevel(level if known else logging.INFO)
    if not known:
        logger.warning("LOG_LEVEL=%s is not a logging level (DEBUG, INFO, WARNING, ERROR); using INFO.", level)


class SuggestingParser(argparse.ArgumentParser):
    """argparse that names the closest subcommand or flag when one is mistyped (as the config
    keys already do; argparse itself learns this only in Python 3.14)."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        unknown = re.match(r"unrecogni[sz]ed arguments?: (.*)", message)
        if unknown:
            message += self.suggest_flags(unknown.group(1).split())
        super().error(message)

    def suggest_flags(self, args: list[str]) -> str:
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        for arg in args:
            if arg.startswith("--"):
                hint = did_you_mean(arg.split("=", 1)[0], flags)
                if hint:
                    return hint
        return ""

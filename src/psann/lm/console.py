"""What the commands print besides their results: psann.lm's log lines on stderr.

The library only logs (importing it adds a NullHandler, as libraries should); each command's
entry point calls `setup_logging()` to show the lines as `psann: message`. LOG_LEVEL=DEBUG (or
WARNING, ...) sets the level, as the earlier LM_training scripts did. Python users who want the
lines call it too, or configure the "psann.lm" logger themselves.
"""

from __future__ import annotations

import logging
import os
import sys

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

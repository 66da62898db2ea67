"""Translation layers: the documented commands of earlier systems, run on psann-lm."""

from __future__ import annotations

import sys
from typing import Callable

from ..console import setup_logging
from ..errors import PsannError


def guarded(run: Callable[[], int]) -> int:
    """A command's exit code: errors the user can fix print one line and exit 2; Ctrl-C exits 130."""
    setup_logging()
    try:
        return run()
    except PsannError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

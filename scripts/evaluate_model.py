#!/usr/bin/env python
"""The Simplified SLM script on psann-lm (README: Migrating): see psann.lm.migrate.slm."""

import sys

from psann.lm.migrate.slm import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())

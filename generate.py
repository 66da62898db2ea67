#!/usr/bin/env python
"""The Simplified SLM generate.py on psann-lm (README: Migrating): see psann.lm.migrate.slm."""

import sys

from psann.lm.migrate.slm import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())

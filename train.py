#!/usr/bin/env python
"""The Simplified SLM train.py on psann-lm (README: Migrating): see psann.lm.migrate.slm."""

import sys

from psann.lm.migrate.slm import train_main

if __name__ == "__main__":
    sys.exit(train_main())

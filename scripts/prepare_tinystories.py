#!/usr/bin/env python
"""The Simplified SLM script on psann-lm (README: Migrating): see psann.lm.migrate.slm."""

import sys

from psann.lm.migrate.slm import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main())

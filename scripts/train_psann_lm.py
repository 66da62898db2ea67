#!/usr/bin/env python
"""Seed-compatible entry point: same as `psannlm train` (config file + --section.key=value overrides).

    python scripts/train_psann_lm.py --config examples/lm/configs/waveresnet_cpu.yaml --train.max_steps=50
"""

import sys

from psann.lm.train.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/train_psann_lm.py"))

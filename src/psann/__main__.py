"""`python -m psann` runs the psannlm command."""

import sys

from psann.cli import main

sys.exit(main())

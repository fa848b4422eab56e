"""`python -m sltrain` runs the `sltrain` command (also under torchrun)."""

import sys

from sltrain.cli import main

sys.exit(main())

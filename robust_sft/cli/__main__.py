"""`python -m robust_sft.cli`: the same as the `robust-sft` console script."""

import sys

from .main import main

sys.exit(main())

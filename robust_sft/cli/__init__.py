"""The `robust-sft` command line (console script `robust_sft.cli:main`); importing it imports no torch.

- [`main`][robust_sft.cli.main]: the entry point and the exit codes.
- [`train`][robust_sft.cli.train]: `robust-sft train <method>`, shared with the example scripts.
- `env`, `tools` (demo, export-taia, perturb, build-cache), `realign`, `evaluate`: the other sub-commands.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]

#!/usr/bin/env python
"""Script form of `megarl convert verify`: HF_DIR MCORE_DIR [--tp N --pp M] (run under torchrun with N x M ranks). Same arguments, same behaviour."""

import sys

from megarl.cli import main

if __name__ == "__main__":  # dist_checkpointing's writer process re-imports the main module
    sys.exit(main(["convert", "verify", *sys.argv[1:]]))

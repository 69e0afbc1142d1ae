#!/usr/bin/env python
"""Script form of `megarl convert hf-to-mcore`: HF_DIR OUT_DIR [--overwrite]. Same arguments, same behaviour."""

import sys

from megarl.cli import main

if __name__ == "__main__":  # dist_checkpointing's writer process re-imports the main module
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))

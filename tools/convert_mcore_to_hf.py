#!/usr/bin/env python
"""Script form of `megarl convert mcore-to-hf`: MCORE_DIR OUT_DIR [--overwrite] [--max-shard-gib G]. Same arguments, same behaviour."""

import sys

from megarl.cli import main

if __name__ == "__main__":  # dist_checkpointing's writer process re-imports the main module
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))

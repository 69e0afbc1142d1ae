"""`megarl train` with vLLM's MoE kernel left unpacked on reload (``VLLMGenerator.repack_moe = False``), in its
own process: vLLM changes process-wide state (environment, threads, seeds) that must not leak into pytest's."""

import sys

from megarl import cli
from megarl.backends.vllm.engine import VLLMGenerator

if __name__ == "__main__":
    VLLMGenerator.repack_moe = False
    sys.exit(cli.main(["train", *sys.argv[1:]]))

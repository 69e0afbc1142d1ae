"""megarl: Megatron-core reinforcement learning for LLM reasoning.

Without an NVIDIA driver, Triton kernels can only run through Triton's interpreter, and Triton reads
TRITON_INTERPRET once, when it is first imported (megatron-core imports it early). So the choice is made here,
before anything imports Triton, from a driver check that needs no torch import.
"""

import os

if "TRITON_INTERPRET" not in os.environ and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version")):
    os.environ["TRITON_INTERPRET"] = "1"

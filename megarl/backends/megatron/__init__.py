"""The Megatron-core backend: the only package that imports ``megatron.core``.

On machines without Transformer Engine/apex, megatron-core warns at import time that it falls back to torch
implementations. That is the expected state on CPU (``megarl env`` reports it once, with what it means), so those
import-time warnings are silenced here; on a GPU without TE, ``megarl env`` warns instead.
"""

import warnings

warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex|Apex) (are|is) not installed")
# raised by TransformerConfig's own default for cuda_graph_scope in 0.16.1, whatever the caller sets
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# torch.distributed.checkpoint deprecations triggered inside megatron-core's dist_checkpointing (0.16.1)
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Warning: tp_group is None", category=DeprecationWarning)

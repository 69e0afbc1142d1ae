"""A weight channel: a process group of the trainer's sender (rank 0) and the rollout engines' workers (ranks
1..n), formed from a TCP store the sender hosts. It is not the trainer's world (``torch.distributed``'s default
group is untouched), so engines on other processes, nodes or a Ray cluster can join and leave it.

A sync streams (HF name, full tensor) pairs: for each, a small JSON header (name, shape, dtype) and then the
tensor are broadcast from the sender; an empty header ends the stream. One tensor is in flight at a time, so
memory stays bounded by the largest tensor. gloo carries CPU tensors (here and in the CPU tests); on GPUs the
same protocol runs over NCCL with CUDA tensors (``backend="nccl"``; not exercised on this CPU machine).

Why our own: vLLM's StatelessProcessGroup + PyNcclCommunicator (what verl and OpenRLHF use) is NCCL-only, and
torch's ProcessGroupGloo / ProcessGroupNCCL constructed on a TCPStore are the two lines underneath it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)}


class WeightChannel:
    def __init__(self, host: str, port: int, rank: int, size: int, *, backend: str = "gloo",
                 timeout_s: float = 600.0):
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore("megarl-weights", store)
        self.store, self.rank, self.size = store, rank, size  # the store must outlive the group
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        elif backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, size)
        else:
            raise ValueError(f"weight channel backend {backend!r}: use 'gloo' or 'nccl'")
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _broadcast(self, t: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def _header(self, header: tuple | None = None) -> tuple | None:
        """Rank 0 broadcasts ``header`` (JSON, never pickle: receivers run no code from the wire); others get it."""
        raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8) if self.rank == 0 else None
        size = torch.tensor([raw.numel() if raw is not None else 0], dtype=torch.int64, device=self.device)
        self._broadcast(size)
        buf = raw.to(self.device) if raw is not None else torch.empty(int(size), dtype=torch.uint8, device=self.device)
        self._broadcast(buf)
        if self.rank == 0:
            return header
        got = json.loads(buf.cpu().numpy().tobytes().decode())
        return None if got is None else (got[0], tuple(got[1]), got[2])

    def send(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Rank 0: stream ``weights`` to every receiver; returns the bytes sent."""
        sent = 0
        for name, tensor in weights:
            t = tensor.detach().to(self.device).contiguous()
            self._header((name, tuple(t.shape), str(t.dtype)))
            self._broadcast(t)
            sent += t.numel() * t.element_size()
        self._header(None)
        return sent

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ranks 1..n: the stream the sender sends, lazily (one tensor at a time)."""
        while (header := self._header()) is not None:
            name, shape, dtype = header
            t = torch.empty(shape, dtype=DTYPES[dtype], device=self.device)
            self._broadcast(t)
            yield name, t

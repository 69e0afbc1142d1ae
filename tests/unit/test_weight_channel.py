"""The weight channel (megarl/backends/ray/channel.py) delivers every tensor bit for bit, in order, to every
receiver, in a process group of its own (the default group is never initialised in the receivers)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from megarl.distributed import free_port


def weights():
    g = torch.Generator().manual_seed(0)
    yield "model.embed_tokens.weight", torch.randn(50, 8, generator=g)
    yield "model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=g).to(torch.bfloat16)
    yield "model.norm.weight", torch.randn(8, generator=g)
    yield "scalar", torch.tensor(3.5)
    yield "empty", torch.zeros(0, 4)


def receiver(port: int, rank: int, size: int, out) -> None:
    import torch.distributed as dist

    from megarl.backends.ray.channel import WeightChannel

    channel = WeightChannel("127.0.0.1", port, rank, size)
    for _ in range(2):  # two syncs over one channel
        got = [(name, t.clone()) for name, t in channel.receive()]
    out.put((rank, got, dist.is_initialized()))


@pytest.mark.cli
def test_every_receiver_gets_every_tensor_exactly():
    from megarl.backends.ray.channel import WeightChannel

    port, size = free_port(), 3
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=receiver, args=(port, r, size, out)) for r in range(1, size)]
    for p in procs:
        p.start()
    try:
        channel = WeightChannel("127.0.0.1", port, 0, size)
        sent = [channel.send(weights()) for _ in range(2)][-1]
        results = sorted(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()
    want = list(weights())
    assert sent == sum(t.numel() * t.element_size() for _, t in want)
    for rank, got, default_group in results:
        assert not default_group
        assert [n for n, _ in got] == [n for n, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

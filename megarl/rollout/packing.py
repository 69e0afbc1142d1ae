"""Sequence packing and token-balanced placement. Pure Python/torch.

Reasoning rollouts have long-tailed lengths, so right-padding every row of a micro-batch to its longest row spends
much of a step's compute on padding. A packed micro-batch is one sequence: its samples back to back, each with
its own positions (0, 1, ...) and attending only to itself, padded only at the tail:

    input_ids   [1, S]   p1 y1 | p2 y2 | ... | pad           S: the same for every micro-batch of a call
    position_ids[1, S]   0..L1-1 | 0..L2-1 | ... | 0..
    cu_seqlens  [n + 2]  0, L1, L1+L2, ..., S                 the padding tail: segments of its own

``cu_seqlens`` is what megatron-core's ``PackedSeqParams`` (THD) takes; ``backends/megatron/packing.py`` turns it
into attention (Transformer Engine's THD kernels, or each sample's causal attention on the local layer spec). Why not
a library: verl's and NeMo-RL's packers are tied to their own batch types; the two algorithms below are a few
lines each and are tested against brute force (tests/unit/test_packing.py).
"""

from __future__ import annotations

import heapq
import math

import torch

from megarl.rollout.batch import MicroBatch, Rollouts, make_micro_batches


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Item indices into bins of total size <= ``capacity``, largest first, each into the first bin it fits (an
    item larger than ``capacity`` gets a bin of its own). Uses at most 11/9 OPT + 6/9 bins. Each bin lists its
    items in ascending index order, and bins are ordered by their first item, so the result is deterministic."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def balanced_partition(sizes: list[int], parts: int) -> list[list[int]]:
    """Item indices dealt into ``parts`` lists with near-equal size sums: sorted greedy (largest item to the
    lightest part so far; the largest sum is at most 4/3 of the optimum). Ties go to the lower part, so every
    rank computes the same answer."""
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + sizes[i], p))
    return [sorted(o) for o in out]


def make_packed_micro_batches(ro: Rollouts, groups: list[list[int]], token_budget: int, *,
                              whole_groups: bool = False, pad_id: int = 0, align: int = 1,
                              multiple: int = 1) -> list[MicroBatch]:
    """Packed micro-batches (module docstring) of the rows of ``groups``: as many as first-fit decreasing needs to
    keep each within ``token_budget``, with the rows then dealt evenly by tokens over them (when that fits), all
    padded to the longest one's length. Rows of one group stay in one
    micro-batch when ``whole_groups`` (a loss that compares the responses of a prompt, e.g. TRPA's pairs);
    otherwise rows are placed one by one, which the global normalisers make exact.

    ``align``: every segment's length is a multiple of it (a sample's own padding at its end, which under the
    causal mask none of its tokens sees): context parallelism cuts each segment into 2 cp chunks. ``multiple``: the
    packed length is a multiple of it (and of ``align``): sequence parallelism splits it over TP ranks."""
    multiple = math.lcm(multiple, align)
    items = groups if whole_groups else [[i] for g in groups for i in g]
    if not items:
        return []
    real = {i: len(ro.prompt_ids[i]) + len(ro.response_ids[i]) for g in items for i in g}
    length = {i: -(-n // align) * align for i, n in real.items()}
    sizes = [sum(length[i] for i in it) for it in items]
    bins = first_fit_decreasing(sizes, token_budget)
    # as many micro-batches as first-fit needs, but with near-equal token counts: they are all padded to the
    # longest, so equal lengths waste nothing (first-fit alone left e.g. 12 + 4 equal samples: 33% padding)
    even = [b for b in balanced_partition(sizes, len(bins)) if b]
    if max(sum(sizes[j] for j in b) for b in even) <= max(token_budget, max(sizes)):
        bins = sorted(even, key=lambda b: b[0])
    rows_of = [[i for j in b for i in items[j]] for b in bins]
    seq = -(-max(sum(length[i] for i in rows) for rows in rows_of) // multiple) * multiple
    out = []
    for rows in rows_of:
        width = max(len(ro.response_ids[i]) for i in rows)
        ids = torch.full((1, seq), pad_id, dtype=torch.int64)
        position_ids = torch.zeros(1, seq, dtype=torch.int64)
        pos = torch.zeros(len(rows), width, dtype=torch.int64)
        tok = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), width)
        padding = torch.ones(1, seq, dtype=torch.bool)
        cu, at = [0], 0
        for r, i in enumerate(rows):
            p, y = ro.prompt_ids[i], ro.response_ids[i]
            n = length[i]
            ids[0, at:at + real[i]] = torch.tensor(p + y)
            padding[0, at:at + real[i]] = False
            position_ids[0, at:at + n] = torch.arange(n)
            pos[r, :] = at + len(p) - 1  # padding columns read a valid position; the mask zeroes them
            pos[r, :len(y)] += torch.arange(len(y))
            tok[r, :len(y)] = torch.tensor(y)
            mask[r, :len(y)] = 1.0
            at += n
            cu.append(at)
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        while at < seq:  # the padding tail: segments no longer than the longest sample, attending to themselves
            n = min(seq - at, longest)
            position_ids[0, at:at + n] = torch.arange(n)
            at += n
            cu.append(at)
        bounds = torch.tensor(cu, dtype=torch.int32)
        out.append(MicroBatch(rows, ids, pos, tok, mask, position_ids=position_ids, cu_seqlens=bounds,
                              max_seqlen=int((bounds[1:] - bounds[:-1]).max()), tokens=sum(real[i] for i in rows),
                              padding=padding))
    return out


def micro_batches(ro: Rollouts, groups: list[list[int]], token_budget: int, *, packing: bool,
                  whole_groups: bool = False, align: int = 1, multiple: int = 1) -> list[MicroBatch]:
    """The micro-batches of one pass: packed (``train.packing``, segments a multiple of ``align`` long) or
    right-padded whole groups (rollout/batch.py); either way ``multiple`` divides their length."""
    if packing:
        return make_packed_micro_batches(ro, groups, token_budget, whole_groups=whole_groups, align=align,
                                         multiple=multiple)
    return make_micro_batches(ro, groups, token_budget, multiple=multiple)

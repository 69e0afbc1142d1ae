"""One RL step's samples as rows, and their packing into equal-shaped micro-batches. Pure torch.

Rows of one prompt (a group) are contiguous. Every micro-batch of a mini-batch has the same shape, because
pipeline stages exchange fixed-size activations. Here (``train.packing=false``) a micro-batch is a whole number of
groups, each row right-padded to the longest; a row's response tokens sit at positions
``prompt_len .. prompt_len + resp_len - 1`` and are predicted by the logits one position earlier. Packed
micro-batches (no padding between samples) are made in ``rollout/packing.py``.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Rollouts:
    """Per-response data of one step on one data-parallel rank. B rows, R = the longest response."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    sampler_logprobs: list[list[float]]  # the generator's log-probs of the sampled tokens
    finish_reasons: list[str]
    group_ids: torch.Tensor  # [B] int64, one id per prompt (unique over the run's data-parallel ranks)
    rewards: torch.Tensor | None = None  # [B] float64 scalar reward (after shaping)
    acc: torch.Tensor | None = None  # [B] float64 1 = correct
    levels: torch.Tensor | None = None  # [B] int64 TRPA preference level, 1 = best
    v_star: torch.Tensor | None = None  # [B] float64 A*-PO V*(prompt)
    advantages: torch.Tensor | None = None  # [B, R] float32
    old_logprobs: torch.Tensor | None = None  # [B, R] float32
    ref_logprobs: torch.Tensor | None = None  # [B, R] float32
    selected: torch.Tensor | None = None  # [B, R] float32, tokens a covariance loss singled out (losses/cov.py)
    versions: torch.Tensor | None = None  # [B] int64: optimizer steps the sampling weights had taken (staleness)
    # [B] int64, partial rollouts: the first token sampled with newer weights (those being trained); the length if none
    switch_at: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.int64)

    @property
    def max_response_len(self) -> int:
        return max((len(r) for r in self.response_ids), default=1)

    def rollout_logprobs(self) -> torch.Tensor:
        """The sampler's log-probs as [B, R] float32, 0 past each response (rollout correction, bypass)."""
        out = torch.zeros(len(self), self.max_response_len)
        for r, lps in enumerate(self.sampler_logprobs):
            out[r, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return out

    def response_mask(self) -> torch.Tensor:
        """[B, R] float32, 1 on real response tokens."""
        lengths = self.response_lengths
        return (torch.arange(self.max_response_len)[None, :] < lengths[:, None]).float()

    def select(self, rows: list[int] | torch.Tensor) -> Rollouts:
        """The given rows (in that order), every field sliced."""
        idx = torch.as_tensor(rows)
        idx = idx.nonzero().squeeze(-1) if idx.dtype == torch.bool else idx.to(torch.int64)
        keep = idx.tolist()
        width = max((len(self.response_ids[i]) for i in keep), default=1)

        def rows_of(t):
            if t is None:
                return None
            return t[idx, :width] if t.dim() == 2 else t[idx]

        return Rollouts([self.prompt_ids[i] for i in keep], [self.response_ids[i] for i in keep],
                        [self.sampler_logprobs[i] for i in keep], [self.finish_reasons[i] for i in keep],
                        self.group_ids[idx], *(rows_of(getattr(self, f)) for f in FIELDS))

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        """The rows of ``parts`` in order (per-token fields right-padded with 0 to the widest). A field is None when
        a part with rows lacks it; parts without rows count only when no part has any (then empty, not None)."""
        def cat(name):
            ts = [getattr(p, name) for p in parts if len(p)] or [getattr(p, name) for p in parts]
            if not ts or any(t is None for t in ts):
                return None
            if ts[0].dim() == 2:
                width = max(t.shape[1] for t in ts)
                ts = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts]
            return torch.cat(ts)

        return Rollouts([x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.response_ids],
                        [x for p in parts for x in p.sampler_logprobs], [x for p in parts for x in p.finish_reasons],
                        torch.cat([p.group_ids for p in parts]), *(cat(f) for f in FIELDS))

    def groups(self) -> list[list[int]]:
        """Row indices of each group, in order of first appearance."""
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids.tolist()):
            out.setdefault(g, []).append(i)
        return list(out.values())


# the optional tensor fields, in declaration order (select and concat carry each of them)
FIELDS = ("rewards", "acc", "levels", "v_star", "advantages", "old_logprobs", "ref_logprobs", "selected", "versions",
          "switch_at")


def split_groups(groups: list[list[int]], parts: int) -> list[list[list[int]]]:
    """Groups dealt into ``parts`` consecutive chunks of near-equal size (the mini-batches of one step)."""
    size, extra = divmod(len(groups), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        out.append(groups[start:end])
        start = end
    return out


def groups_per_micro_batch(n_groups: int, group_size: int, seq_len: int, token_budget: int) -> int:
    """The largest divisor k of ``n_groups`` with k * group_size * seq_len <= token_budget (at least 1), so all
    micro-batches are full and equal: no padding rows, which would distort per-sequence normalisers."""
    fit = max(1, token_budget // max(1, group_size * seq_len))
    return max(k for k in range(1, n_groups + 1) if n_groups % k == 0 and k <= fit) if n_groups else 1


@dataclasses.dataclass
class MicroBatch:
    """Tensors of one micro-batch. b rows, S = sequence length, R = response width."""

    rows: list[int]  # row indices into the step's Rollouts
    input_ids: torch.Tensor  # [b, S] int64 (packed: [1, S])
    resp_positions: torch.Tensor  # [b, R] int64: index into input_ids.view(-1) whose output predicts token j
    resp_tokens: torch.Tensor  # [b, R] int64
    mask: torch.Tensor  # [b, R] float32
    position_ids: torch.Tensor | None = None  # packed: [1, S], restarting at 0 in every sample
    cu_seqlens: torch.Tensor | None = None  # packed: [n + 1] int32 segment boundaries (megatron's THD format)
    max_seqlen: int = 0  # packed: the longest segment
    tokens: int = 0  # tokens of samples; the rest of input_ids is padding
    padding: torch.Tensor | None = None  # [b, S] bool: True where input_ids holds no sample's token


def make_micro_batches(ro: Rollouts, groups: list[list[int]], token_budget: int, pad_id: int = 0,
                       multiple: int = 1) -> list[MicroBatch]:
    """Equal-shaped micro-batches of whole groups covering ``groups`` (module docstring), their length rounded up
    to a multiple of ``multiple`` (sequence parallelism splits it over TP ranks)."""
    if not groups:
        return []
    rows = [i for g in groups for i in g]
    seq_len = -(-max(len(ro.prompt_ids[i]) + len(ro.response_ids[i]) for i in rows) // multiple) * multiple
    width = max(len(ro.response_ids[i]) for i in rows)
    sizes = {len(g) for g in groups}
    k = groups_per_micro_batch(len(groups), max(sizes), seq_len, token_budget) if len(sizes) == 1 else 1
    if len(sizes) > 1:  # uneven groups cannot form equal shapes from whole groups; one row per micro-batch
        chunks = [[i] for i in rows]
    else:
        chunks = [[i for g in groups[j:j + k] for i in g] for j in range(0, len(groups), k)]
    out = []
    for chunk in chunks:
        ids = torch.full((len(chunk), seq_len), pad_id, dtype=torch.int64)
        pos = torch.zeros(len(chunk), width, dtype=torch.int64)
        tok = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(chunk), width)
        padding = torch.ones(len(chunk), seq_len, dtype=torch.bool)
        for r, i in enumerate(chunk):
            p, y = ro.prompt_ids[i], ro.response_ids[i]
            ids[r, :len(p) + len(y)] = torch.tensor(p + y)
            padding[r, :len(p) + len(y)] = False
            pos[r, :len(y)] = torch.arange(len(p) - 1, len(p) - 1 + len(y))
            pos[r, len(y):] = len(p) - 1  # padding reads a valid position; the mask zeroes it
            pos[r] += r * seq_len  # into input_ids.view(-1)
            tok[r, :len(y)] = torch.tensor(y)
            mask[r, :len(y)] = 1.0
        out.append(MicroBatch(chunk, ids, pos, tok, mask, padding=padding,
                              tokens=sum(len(ro.prompt_ids[i]) + len(ro.response_ids[i]) for i in chunk)))
    return out


def row_field(t: torch.Tensor | None, mb: MicroBatch) -> torch.Tensor | None:
    """A per-row [B] or per-token [B, R] field of the step, cut to the micro-batch's rows and width."""
    if t is None:
        return None
    picked = t[torch.tensor(mb.rows)]
    if picked.dim() == 1:
        return picked
    width = mb.mask.shape[1]
    if picked.shape[1] < width:
        picked = torch.nn.functional.pad(picked, (0, width - picked.shape[1]))
    return picked[:, :width]

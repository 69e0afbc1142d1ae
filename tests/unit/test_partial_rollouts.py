"""Partial rollouts without Ray or vLLM: the segment driver (megarl/backends/ray/partial.py) against a fake engine
whose weights change between calls, and what the loop derives from its segments (switch points, metrics)."""

from __future__ import annotations

import threading

import pytest
import torch

from megarl.backends.protocols import Completion, SamplingParams
from megarl.backends.ray import partial
from megarl.trainer.collect import Round, finish_round

STOP = 99


class FakeEngine:
    """Samples, for prompt p, the tokens len(p), len(p)+1, ... (its weights' tag + 0.5 as each log-prob); a prompt
    whose first token is 7 stops after 3 tokens in all. Records every call; ``tag`` moves when a test says so."""

    def __init__(self):
        self.tag, self.calls = 1, []

    def generate_tagged(self, prompts, n, sampling, seeds):
        self.calls.append((prompts, n, sampling.max_tokens, seeds))
        out = []
        for p in prompts:
            cs = []
            for _ in range(n):
                ids = [len(p) + i for i in range(sampling.max_tokens)]
                total, reason = len(p) - self.prompt_len[tuple(p[:2])], "length"
                if p[0] == 7 and total + len(ids) >= 3:
                    ids, reason = ids[:3 - total - 1] + [STOP], "stop"
                cs.append(Completion(ids, [self.tag + 0.5] * len(ids), reason))
            out.append(cs)
        tag = self.tag
        self.tag = self.next_tag.get(len(self.calls), self.tag)  # weights pushed after this call
        return tag, out


def drive(engine, prompts, n, max_tokens, tokens, next_tag):
    engine.prompt_len = {tuple(p[:2]): len(p) for p in prompts}
    engine.next_tag = next_tag
    gate = threading.Event()
    gate.set()
    orig = partial.Segmented._call
    partial.Segmented._call = lambda self, *a: engine.generate_tagged(*a)
    try:
        return partial.Segmented(engine, prompts, [11, 12], n, SamplingParams(max_tokens=max_tokens), tokens,
                                 gate).get()
    finally:
        partial.Segmented._call = orig


def test_segments_continue_each_sample_and_record_the_weights_of_each_token():
    engine = FakeEngine()
    outs = drive(engine, [[1, 2, 3], [7, 8]], n=2, max_tokens=7, tokens=2, next_tag={1: 2})  # push after call 1
    first, stopped = outs
    for c in first:  # 7 tokens in segments of 2, 2, 2, 1; the first 2 with tag 1, the rest with tag 2
        assert c.token_ids == list(range(3, 10)) and c.finish_reason == "length"
        assert c.logprobs == [1.5, 1.5] + [2.5] * 5 and c.segments == [(0, 1), (2, 2)]
    for c in stopped:  # stopped inside segment 2
        assert c.token_ids == [2, 3, STOP] and c.finish_reason == "stop" and c.segments == [(0, 1), (2, 2)]
    prompts, n, budget, seeds = engine.calls[0]
    assert n == 2 and budget == 2 and seeds == [11, 12]
    prompts, n, budget, seeds = engine.calls[1]  # every unfinished sample alone, its tokens appended to its prompt
    assert n == 1 and budget == 2 and prompts == [[1, 2, 3, 3, 4]] * 2 + [[7, 8, 2, 3]] * 2
    assert seeds == [partial.continuation_seed(11, 0, 1), partial.continuation_seed(11, 1, 1),
                     partial.continuation_seed(12, 0, 1), partial.continuation_seed(12, 1, 1)]
    assert len(set(seeds)) == 4
    assert [c[2] for c in engine.calls[2:]] == [2, 1]  # the last segment asks only for what is left


def test_without_a_push_a_segmented_sample_has_one_run():
    outs = drive(FakeEngine(), [[1, 2, 3]], n=1, max_tokens=5, tokens=2, next_tag={})
    assert outs[0][0].segments == [(0, 1)] and len(outs[0][0].token_ids) == 5


def test_a_push_waits_at_the_gate_between_segments():
    engine = FakeEngine()
    engine.prompt_len, engine.next_tag = {(1, 2): 3}, {}
    gate = threading.Event()  # a push pending from the start: no second segment until it is set
    orig = partial.Segmented._call
    partial.Segmented._call = lambda self, *a: engine.generate_tagged(*a)
    try:
        call = partial.Segmented(engine, [[1, 2, 3]], [5], 1, SamplingParams(max_tokens=4), 2, gate)
        call.thread.join(timeout=0.5)
        assert call.thread.is_alive() and len(engine.calls) == 1
        engine.tag = 3  # the push ran
        gate.set()
        (c,), = call.get()
    finally:
        partial.Segmented._call = orig
    assert c.segments == [(0, 1), (2, 3)] and c.logprobs == [1.5, 1.5, 3.5, 3.5]


def test_finish_round_marks_where_the_weights_being_trained_took_over():
    class Gen:
        tag = 2  # the sync count of the weights it holds now

        def collect(self, ticket):
            return ticket.work

    from megarl.backends.protocols import Ticket
    from megarl.data.source import Prompt

    # a queue of rounds: a sample may span several pushes; only the tokens of the current weights (tag 2) count
    outs = [[Completion([1, 2, 3, 4], [0.0] * 4, "length", [(0, 1), (2, 2)]),
             Completion([5, 6], [0.0] * 2, "stop", [(0, 1)]),
             Completion([1, 2, 3, 4, 5], [0.0] * 5, "length", [(0, 0), (1, 1), (3, 2)]),
             Completion([1, 2, 3], [0.0] * 3, "stop", [(0, 0), (1, 1)])]]  # ended before the last push
    r = Round([Prompt(0, [9], "x", None, {})], Ticket(outs), 1, version=3, n=4)
    ro, _ = finish_round(Gen(), r, now=4)
    assert ro.switch_at.tolist() == [2, 2, 3, 3] and ro.versions.tolist() == [3] * 4
    outs[0][1].segments = None  # an unsegmented call: no switch points at all
    assert finish_round(Gen(), r, now=4)[0].switch_at is None


def test_partial_metrics_against_brute_force(megatron_world):
    from megarl.rollout.batch import Rollouts
    from megarl.trainer.state import step_metrics
    from megarl.metrics import Timer

    ro = Rollouts([[1]] * 3, [[1, 2, 3, 4], [1, 2], [1, 2, 3]], [[0.0, 0.0, -1.0, -1.0], [0.0, 0.0], [0.0] * 3],
                  ["length", "stop", "length"], torch.tensor([0, 0, 1]))
    ro.old_logprobs = torch.tensor([[0.5, 0.0, -1.1, -0.7], [0.0, 0.2, 0.0, 0.0], [0.0, 0.0, -0.05, 0.0]])
    ro.switch_at = torch.tensor([2, 2, 2])  # sample 1 ended before its switch
    ro.versions = torch.tensor([0, 0, 0])
    out = step_metrics(ro, None, [], {}, {}, Timer(), 1.0, None, now=1)
    assert out["rollout/partial_fraction"] == pytest.approx(2 / 3)
    assert out["rollout/partial_logprob_diff_max"] == pytest.approx(0.3)  # tokens 2.. of samples 0 and 2
    assert out["rollout/logprob_diff_max"] == pytest.approx(0.5)

"""Partial rollouts (``rollout.partial=true``): a fleet call sampled in segments, so that weights pushed while it is
in flight take over its unfinished sequences (docs/async.md).

An engine actor runs one call at a time, so a weight push queued behind a whole call waits for all of it. Here
rank 0 drives each engine's share of a call from a thread, ``rollout.partial_tokens`` tokens at a time:

    segment 1     n samples of each prompt, at most partial_tokens tokens each (the prompt's own seed)
    segment k     every unfinished sample continued alone: its prompt + its tokens so far as the prompt, n = 1
    between two   the thread waits while a push is pending (``gate``), so the push runs on the engine next

Each segment comes back with the tag of the engine's weights (the fleet's sync count), so a sample records which
of its tokens came from which weights (``Completion.segments``), and its per-token sampler log-probs are those of
the weights that sampled each token: what rollout correction compares against pi_old, token by token.
A sample's randomness: segment 1 uses the prompt's seed, segment k a seed derived from (that seed, sample, k), so a
partial call samples other tokens than an unsegmented one, but the same ones for the same weights and seeds.
"""

from __future__ import annotations

import dataclasses
import threading

from megarl.backends.protocols import Completion, SamplingParams


def continuation_seed(seed: int, sample: int, segment: int) -> int:
    return (seed * 1_000_003 + sample * 7919 + segment) % (1 << 31)


def merged(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of one tag, each as (first token index, tag)."""
    out: list[tuple[int, int]] = []
    for start, tag in segments:
        if not out or out[-1][1] != tag:
            out.append((start, tag))
    return out


class Segmented:
    """Rank 0: one engine's share of a fleet call, sampled segment by segment on a thread of its own; ``get()``
    waits for it (and raises what the thread raised, e.g. a dead engine's ``RayActorError``)."""

    def __init__(self, engine, prompts: list[list[int]], seeds: list[int], n: int, sampling: SamplingParams,
                 tokens: int, gate: threading.Event):
        self.engine, self.gate = engine, gate
        self.result: list[list[Completion]] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(prompts, seeds, n, sampling, tokens), daemon=True)
        self.thread.start()

    def _call(self, prompts, n, sampling, seeds):
        import ray

        return ray.get(self.engine.call("generate_tagged", prompts, n, sampling, seeds))[0]

    def _run(self, prompts, seeds, n, sampling, tokens) -> None:
        try:
            self.result = self._sample(prompts, seeds, n, sampling, tokens)
        except BaseException as e:  # noqa: BLE001 -- handed to get(), on the trainer's thread
            self.error = e

    def _sample(self, prompts, seeds, n, sampling, tokens) -> list[list[Completion]]:
        step = dataclasses.replace(sampling, max_tokens=min(tokens, sampling.max_tokens))
        tag, first = self._call(prompts, n, step, seeds)
        out = [[Completion(list(c.token_ids), list(c.logprobs), c.finish_reason, [(0, tag)]) for c in cs]
               for cs in first]
        segment, ended = 1, set()  # ended: samples the engine would not continue (e.g. at its max_model_len)
        while True:
            todo = [(i, j) for i, cs in enumerate(out) for j, c in enumerate(cs) if (i, j) not in ended
                    and c.finish_reason == "length" and len(c.token_ids) < sampling.max_tokens]
            if not todo:
                break
            self.gate.wait()  # a push pending: it runs on the engine before the next segment
            left = min(len(out[i][j].token_ids) for i, j in todo)  # the shortest has the most tokens left
            step = dataclasses.replace(sampling, max_tokens=min(tokens, sampling.max_tokens - left))
            tag, more = self._call([prompts[i] + out[i][j].token_ids for i, j in todo], 1, step,
                                   [continuation_seed(seeds[i], j, segment) for i, j in todo])
            for (i, j), (c,) in zip(todo, more):
                done = out[i][j]
                room = sampling.max_tokens - len(done.token_ids)  # a call's budget fits the shortest; cut others
                ids, lps = c.token_ids[:room], c.logprobs[:room]
                if not ids:
                    ended.add((i, j))
                    continue
                done.segments.append((len(done.token_ids), tag))
                done.token_ids += ids
                done.logprobs += lps
                done.finish_reason = c.finish_reason if len(c.token_ids) <= room else "length"
            segment += 1
        for cs in out:
            for c in cs:
                c.segments = merged(c.segments)
        return out

    def get(self) -> list[list[Completion]]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result

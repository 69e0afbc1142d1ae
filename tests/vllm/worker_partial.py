"""Runs in its own process: a Ray fleet call with partial rollouts (segments of 2 tokens) in flight while the
policy's weights change and are pushed; reports, token by token, each sampler log-prob against the trainer's
recomputation with the old and with the new weights, and which weights the fleet says sampled it."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch


def main(model_dir: str, run_dir: str, data: str) -> None:
    from megarl.rollout.batch import Rollouts
    from tests.vllm.components import built

    out = {}
    with built(model_dir, run_dir, data, "rollout.placement=ray", "rollout.max_staleness=1", "rollout.partial=true",
               "rollout.partial_tokens=2", "rollout.max_tokens=12") as c:
        c.generator.sync()
        prompts = [p.ids for p in c.source.take(0, 3)]
        params = list(c.policy.module.parameters())
        old = [p.detach().clone() for p in params]
        ticket = c.generator.submit(prompts, 2, dataclasses.replace(c.sampling, max_tokens=12))
        with torch.no_grad():  # new weights, pushed while the call is in flight
            for p in params:
                p.mul_(1.05)
        c.policy.version += 1
        out["sync"] = c.generator.sync()
        outs = c.generator.collect(ticket)
        done = [d for ds in outs for d in ds]
        ro = Rollouts([p for p, cs in zip(prompts, outs) for _ in cs], [d.token_ids for d in done],
                      [d.logprobs for d in done], [d.finish_reason for d in done],
                      torch.arange(len(done), dtype=torch.int64))
        new, _ = c.policy.logprobs(ro, 4096, 1.0)
        with torch.no_grad():
            for p, o in zip(params, old):
                p.copy_(o)
        before, _ = c.policy.logprobs(ro, 4096, 1.0)
        out["samples"] = [{"segments": d.segments, "sampler": d.logprobs, "old": before[i, :len(d.logprobs)].tolist(),
                           "new": new[i, :len(d.logprobs)].tolist(), "finish": d.finish_reason}
                          for i, d in enumerate(done)]
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])

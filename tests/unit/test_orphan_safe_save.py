"""Helper processes of a checkpoint save die with a SIGKILLed trainer (no writer or queue manager left behind),
and forks made outside a save are left alone."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, multiprocessing as mp, sys, time
    from megarl.backends.megatron import checkpoint
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    fork = mp.get_context("fork")
    outside = fork.Process(target=time.sleep, args=(600,))
    outside.start()
    with checkpoint._orphan_safe_save():
        inside = fork.Process(target=time.sleep, args=(600,))  # as megatron-core forks its writers
        inside.start()
        manager = filesystem_async._results_manager._process.pid
        print(json.dumps({"outside": outside.pid, "inside": inside.pid, "manager": manager}), flush=True)
        time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_save_helpers_die_with_a_killed_trainer():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        helpers = {name: psutil.Process(pid) for name, pid in pids.items()}
        assert all(p.is_running() for p in helpers.values())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs([helpers["inside"], helpers["manager"]], timeout=20)
        assert not alive, f"outlived the killed trainer: {[p.cmdline() for p in alive]}"
        assert helpers["outside"].is_running(), "a fork made outside a save was killed too"
    finally:
        proc.kill()
        for helper in locals().get("helpers", {}).values():
            try:
                helper.kill()
            except psutil.NoSuchProcess:
                pass

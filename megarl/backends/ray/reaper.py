"""``python -m megarl.backends.ray.reaper PID``: while process PID lives, remember its descendants; once it is gone,
kill those still running.

A run that starts its own local Ray cluster is that cluster's driver. Killed with SIGKILL (or by the OOM killer),
Ray's own fate-sharing takes the GCS, the raylet and the engine actors down with it, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) were measured to linger for about 1.5 minutes after. The fleet
starts this watcher first; it costs one sleeping process. ``psutil``'s process handles compare creation times, so
a recycled PID is never killed.
"""

from __future__ import annotations

import os
import sys
import time

import psutil


def watch(pid: int, interval: float = 0.5) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                break
            for p in parent.children(recursive=True):
                if p.pid != os.getpid():
                    seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    for p in seen.values():
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))

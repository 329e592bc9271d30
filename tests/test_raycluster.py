"""A local Ray started by a job leaves nothing behind when its driver is killed with SIGKILL."""
import os
import signal
import subprocess
import sys
import time

import psutil

from conftest import REPO

DRIVER = """
import sys, time
from iqa_spider.raycluster import ensure_ray
ensure_ray(None, 1)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_drivers_local_ray_is_reaped():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_ADDRESS": ""})
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3)   # the agents and the watchdog's first look at the tree
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "raylet" in names and "ray::DashboardAgent" in names, names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                                  for p in tree):
            time.sleep(0.5)
        left = [(p.pid, p.name()) for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, left   # without the watchdog the agents outlive the driver by a minute or more
    finally:
        if proc.poll() is None:
            proc.kill()

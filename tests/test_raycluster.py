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


def command_line(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:   # ended meanwhile (a short-lived worker)
        return ""


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_killed_drivers_local_ray_is_reaped():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "platform"), "RAY_ADDRESS": ""})
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30   # the raylet's agents start beside it
        while True:
            tree = psutil.Process(proc.pid).children(recursive=True)
            names = " ".join(command_line(p) for p in tree)
            if ("raylet" in names and "ray::DashboardAgent" in names) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "raylet" in names and "ray::DashboardAgent" in names, names
        time.sleep(2)   # the watchdog's next look at the tree
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.5)
        left = [(p.pid, command_line(p)[:60]) for p in tree if alive(p)]
        assert not left, left   # without the watchdog the agents outlive the driver by a minute or more
    finally:
        if proc.poll() is None:
            proc.kill()

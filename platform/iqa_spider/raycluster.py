"""Connecting to Ray the same way in every job, and leaving nothing behind a local one.

Run as ``python -m iqa_spider.raycluster --reap-after PID`` it is the watchdog that
:func:`ensure_ray` starts beside a local Ray (see :func:`reap_after`).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)

# How often the watchdog looks at the driver's process tree, and how long it lets Ray's own
# shutdown run once the driver is gone before it kills what is left.
REAPER_POLL_S = 1.0
REAPER_GRACE_S = 3.0


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Use the running Ray if there is one, else connect to `address` / RAY_ADDRESS, else start locally.

    Under `ray job submit` RAY_ADDRESS is set, so the same job file joins the cluster it was
    submitted to; on a laptop it starts a local Ray with `num_cpus`, with a watchdog that
    ends its processes if this driver is killed.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray at %s", address)
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner and
        # `ray job submit` need; it costs about 2 s of start-up and moves to a free port if
        # 8265 is taken.
        ray.init(num_cpus=num_cpus, include_dashboard=True, log_to_driver=True)
        start_reaper(os.getpid())
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


# Starts its arguments as a process in a session of its own, and exits at once.
_DETACH = ("import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True, "
           "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)")


def start_reaper(driver_pid: int) -> None:
    """Start the watchdog of a local Ray started by ``driver_pid``.

    Started through a launcher that exits at once, so the watchdog is no child of the driver:
    when a driver dies, Ray kills the processes left under it, and a child watchdog would die
    with the driver before it could act (seen with Ray 2.60). A session of its own keeps a
    signal to the driver's group from reaching it.
    """
    subprocess.run([sys.executable, "-c", _DETACH, sys.executable, "-m", "iqa_spider.raycluster",
                    "--reap-after", str(driver_pid)], check=True, timeout=60)


def reap_after(driver_pid: int, poll_s: float = REAPER_POLL_S, grace_s: float = REAPER_GRACE_S) -> int:
    """Wait for the driver to end, then kill what is left of the Ray it started; returns how many.

    A local Ray's GCS and raylet end with the driver, but the raylet's agents
    (DashboardAgent, RuntimeEnvAgent) and workers outlive a driver killed with SIGKILL by a
    minute or more, orphaned. The watchdog remembers every process under the driver while it
    runs (psutil identifies each by pid *and* start time, so a reused pid is never killed).
    """
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    time.sleep(grace_s)
    killed = 0
    for proc in seen.values():
        try:
            if proc.is_running():
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reap-after", type=int, required=True, metavar="PID")
    reap_after(parser.parse_args().reap_after)

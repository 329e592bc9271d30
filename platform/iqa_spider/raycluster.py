"""Connecting to Ray the same way in every job."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Use the running Ray if there is one, else connect to `address` / RAY_ADDRESS, else start locally.

    Under `ray job submit` RAY_ADDRESS is set, so the same job file joins the cluster it was
    submitted to; on a laptop it starts a local Ray with `num_cpus`.
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
        log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))

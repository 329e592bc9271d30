"""A lease on promotions of one registered model, shared by every process and machine that
uses the registry.

The lease *is* a registered model named ``<name>.promotion-lock``, created with the owner and
expiry as tags. Creating a registered model is atomic in MLflow's database stores (a unique
key on the name: the loser gets RESOURCE_ALREADY_EXISTS), so two holders are impossible
without relying on timing, unlike a tag written and read back. A lease older than ``ttl_s``
(a crashed holder) is broken. Promotion holds it only for the decision and the alias moves
(docs/registry.md).
"""
from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid

from iqa_spider.registry.config import PromotionLockSettings

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"


class PromotionError(RuntimeError):
    """The promotion or rollback could not be carried out (not a gate refusal)."""


def error_code(exc: Exception) -> str:
    """The MLflow error code of an MlflowException ("" for anything else)."""
    return str(getattr(exc, "error_code", ""))


class RegistryLock:
    """A lease on promotions of one registered model: the registered model ``<name>.promotion-lock``."""

    def __init__(self, client, name: str, settings: PromotionLockSettings | None = None):
        self.client, self.name = client, name + LOCK_SUFFIX
        self.settings = settings or PromotionLockSettings()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _holder(self) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(self.name).tags)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in error_code(exc):
                return None
            raise

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.settings.wait_s
        while True:
            expires = time.time() + self.settings.ttl_s
            try:
                self.client.create_registered_model(
                    self.name, tags={"owner": self.owner, "expires_at": f"{expires:.3f}"},
                    description="held while a promotion or rollback moves aliases; see docs/registry.md")
                return
            except MlflowException as exc:
                if not any(c in error_code(exc) for c in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")):
                    raise
            holder = self._holder()
            if holder is not None and holder.get("owner") == self.owner:
                return  # our create went through but its answer was lost (client retry)
            if holder is not None and float(holder.get("expires_at", 0)) < time.time():
                self._break(holder)
                continue
            if time.monotonic() > deadline:
                raise PromotionError(f"lock {self.name} held by {holder and holder.get('owner')} for longer than "
                                     f"{self.settings.wait_s:.0f} s")
            time.sleep(self.settings.poll_s * random.uniform(0.5, 1.5))

    def _break(self, stale: dict[str, str]) -> None:
        """Delete a lease whose holder let it expire (re-read first: only that holder's)."""
        now = self._holder()
        if now is None or now.get("owner") != stale.get("owner"):
            return
        log.warning("breaking stale promotion lock %s of %s", self.name, stale.get("owner"))
        self.release(owner=stale.get("owner"))

    def held(self) -> bool:
        holder = self._holder()
        return holder is not None and holder.get("owner") == self.owner \
            and float(holder.get("expires_at", 0)) > time.time()

    def release(self, owner: str | None = None) -> None:
        from mlflow.exceptions import MlflowException

        holder = self._holder()
        if holder is None or holder.get("owner") != (owner or self.owner):
            return
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in error_code(exc):
                raise

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["RegistryLock", "PromotionError", "LOCK_SUFFIX", "error_code"]

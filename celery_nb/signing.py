"""Signed job requests and results: a broker-reachable attacker must not be able to make a
worker run a job, or a kernel unpickle a result, that no holder of the shared secret sent.

With ``CELERY_NB_SECRET`` set (the same value on kernels and workers), the kernel signs each
request (HMAC-SHA256 over its JSON, which includes a digest of a payload sent by reference) and
the worker refuses unsigned or altered ones before anything runs; the worker signs each
result's digest and the kernel checks it before unpickling. Without a secret nothing is signed:
fine for the embedded worker, not for a broker others can reach.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

SECRET_ENV = "CELERY_NB_SECRET"


def digest(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


class Signer:
    def __init__(self, secret: str | None = None) -> None:
        secret = secret if secret is not None else os.environ.get(SECRET_ENV)
        self._key = secret.encode() if secret else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _mac(self, message: dict[str, Any]) -> str:
        canonical = json.dumps(message, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._key, canonical, hashlib.sha256).hexdigest()

    def sign(self, message: dict[str, Any]) -> dict[str, Any]:
        """``message`` with a "sig" field (unchanged when signing is off)."""
        return {**message, "sig": self._mac(message)} if self._key else message

    def verify(self, message: dict[str, Any]) -> bool:
        """True if signing is off, or the message carries a valid signature."""
        if not self._key:
            return True
        unsigned = {k: v for k, v in message.items() if k != "sig"}
        return isinstance(message.get("sig"), str) and hmac.compare_digest(message["sig"], self._mac(unsigned))

"""Signed job requests and results: a broker-reachable attacker must not be able to make a
worker run a job, or a kernel unpickle a result, that no holder of the shared secret sent.

With ``CELERY_NB_SECRET`` set (the same value on kernels and workers), the kernel signs each
request (HMAC-SHA256 over its JSON, which includes the digest of a payload in the blob store)
and the worker refuses unsigned or altered ones before anything runs; the worker signs each
result's digest and the kernel checks it before unpickling. Without a secret nothing is signed:
fine for the embedded worker, not for a broker others can reach.

A payload or result in the kernel's shared memory folder (celery_nb.shm) is signed by its name,
not by its bytes' digest (for 100 MiB, some 85 ms on each side here): the folder is private to
the kernel's user (mode 0700, checked on both sides), its files are made with names no one can
guess and never reused, a payload is written by the kernel and a result by the job's own
process, into a file the worker made and handed to that process alone. Only the kernel's user
and root can change them, who need no broker to run anything; the signed request and the
signed end event say which file is the job's.

A signature covers when it was made and when it expires (LIFETIME later), so a captured message
cannot be replayed for ever: within its lifetime a replayed request is of a job the job store
knows has finished (its done marker lives as long, and the worker drops it), after it the
worker refuses it as expired.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import time
from typing import Any

from celery_nb.errors import SignatureError
from celery_nb.jobstore import DEFAULT_TTL

SECRET_ENV = "CELERY_NB_SECRET"
CLOCK_SKEW = 300.0  # s by which the clocks of kernels, workers and Redis may differ
# s a signature is valid: shorter than a finished job's done marker lives (DEFAULT_TTL from its
# end), with room for the clocks' differences, so that a request is refused as expired before
# its job's done marker can have gone
LIFETIME = DEFAULT_TTL - 4 * CLOCK_SKEW


def digest(data: Any) -> str:
    """The SHA-256 of ``data``: bytes-like, or a list of bytes-like pieces (of their concatenation)."""
    sha = hashlib.sha256()
    for piece in data if isinstance(data, list) else [data]:
        sha.update(memoryview(piece).cast("B"))
    return sha.hexdigest()


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
        """``message`` with "signed_at", "expires_at" (LIFETIME later) and "sig" (unchanged when
        signing is off)."""
        if not self._key:
            return message
        now = time.time()
        stamped = {**message, "signed_at": now, "expires_at": now + LIFETIME}
        return {**stamped, "sig": self._mac(stamped)}

    def check(self, message: dict[str, Any], whose: str) -> None:
        """Nothing if signing is off or ``message`` carries a valid signature, made no later
        than now and not expired (give or take CLOCK_SKEW); else a SignatureError saying why,
        worded to follow "its request" or "its result". ``whose``: whose secret, as the
        message says it ("the worker's")."""
        if not self._key:
            return
        unsigned = {k: v for k, v in message.items() if k != "sig"}
        if not (isinstance(message.get("sig"), str) and hmac.compare_digest(message["sig"], self._mac(unsigned))):
            # (a kernel and a worker of different celery_nb versions may sign different fields)
            raise SignatureError(f"is not signed with {whose} CELERY_NB_SECRET, or was altered on the way, or was "
                                 f"signed by another celery_nb version (set the same CELERY_NB_SECRET, and install the "
                                 f"same celery_nb version, for the kernels and the workers)")
        signed_at, expires_at = message.get("signed_at"), message.get("expires_at")
        if not isinstance(signed_at, (int, float)) or not isinstance(expires_at, (int, float)):
            raise SignatureError("carries no signing time: an older celery_nb signed it; use the same celery_nb "
                                 "version for the kernels and the workers")
        now = time.time()
        if now > expires_at + CLOCK_SKEW:
            raise SignatureError(f"expired at {_when(expires_at)} (signed at {_when(signed_at)}): it was replayed, "
                                 f"or waited longer than that; send the job again")
        if signed_at > now + CLOCK_SKEW:
            raise SignatureError(f"was signed at {_when(signed_at)}, {signed_at - now:.0f} s ahead of this host's "
                                 f"clock; the clocks of kernels and workers may differ by {CLOCK_SKEW:g} s at most: "
                                 f"synchronise them (NTP)")


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

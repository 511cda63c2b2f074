"""The code bundles of kernels' local modules (celery_nb.local_code), kept by the worker by
content hash: fetched from the blob store only when this worker does not have one yet, and
checked against the hash the (signed) request names before any container gets it.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from celery_nb.blobs import BlobStore, MissingBlobError
from celery_nb.errors import InputError

CODE_CACHE_BYTES = 64 << 20  # the least recently used bundles go beyond this


class CodeCache:
    def __init__(self, blobs: BlobStore, max_bytes: int = CODE_CACHE_BYTES) -> None:
        self._blobs = blobs
        self._max_bytes = max_bytes
        self._bundles: OrderedDict[str, bytes] = OrderedDict()  # digest -> bundle, least recently used first
        self._size = 0
        self._lock = threading.Lock()

    def get(self, code: dict[str, Any]) -> bytes:
        """The bundle a request's ``code`` entry ({"module", "digest", "ref"}) names."""
        digest = code["digest"]
        with self._lock:
            if digest in self._bundles:
                self._bundles.move_to_end(digest)
                return self._bundles[digest]
        try:
            bundle = bytes(self._blobs.get(code["ref"]))
        except MissingBlobError:
            raise InputError(f"the code of local module {code['module']!r} is no longer in the blob store (it "
                             f"expired, or the store was emptied); run the job again and the kernel sends it "
                             f"again") from None
        if hashlib.sha256(bundle).hexdigest() != digest:
            raise InputError(f"the code of local module {code['module']!r} in the blob store does not match the "
                             f"hash its request names: it was altered; nothing ran")
        with self._lock:
            if digest not in self._bundles:
                self._bundles[digest] = bundle
                self._size += len(bundle)
            while self._size > self._max_bytes and len(self._bundles) > 1:
                self._size -= len(self._bundles.popitem(last=False)[1])
        return bundle

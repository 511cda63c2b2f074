"""Big payloads and results by reference, outside the Celery message and the event stream.

Redis (the broker's server) by default: a blob is stored in chunks with an expiry, written
and read with pipelining, and read into one preallocated buffer, so a 100 MiB result costs
the kernel one 100 MiB buffer that the unpickled arrays then use in place. An S3-compatible
store instead, for workers on many hosts: CELERY_NB_BLOB_URL=s3://bucket/prefix (see
S3BlobStore). The embedded default keeps blobs in memory. Blobs are deleted once their
result has been collected; the code bundles of kernels' local modules, stored under their
content hash, expire instead (and are touched by each job that uses them).
"""
from __future__ import annotations

import contextlib
import heapq
import io
import mmap
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_nb.jobstore import DEFAULT_PATIENCE, DEFAULT_TTL, connect_redis, redis_retry

BLOB_THRESHOLD = 1 << 20  # payloads and results above this travel as blobs
CHUNK_SIZE = 8 << 20


class BlobStore(Protocol):
    def put(self, pieces: list[Any], name: str | None = None) -> dict[str, Any]:
        """Store the concatenation of ``pieces`` (bytes-like); returns a JSON-able reference.
        ``name``: the blob's name, e.g. a content hash, so that the same blob is stored once
        (default: a new unique one)."""

    def get(self, ref: dict[str, Any]) -> memoryview: ...

    def delete(self, ref: dict[str, Any]) -> None: ...

    def expire(self, ref: dict[str, Any], seconds: float) -> None:
        """Delete the blob after ``seconds`` instead of the store's usual expiry."""

    def touch(self, ref: dict[str, Any]) -> bool:
        """Whether the blob is still there (its expiry starts again where blobs have one)."""


class MissingBlobError(KeyError):
    """The blob expired or was deleted."""


def blob_store_for(broker_url: str, patience: float = DEFAULT_PATIENCE) -> BlobStore:
    """The blob store of the kernels and workers of ``broker_url``: $CELERY_NB_BLOB_URL
    (s3://bucket/prefix?endpoint_url=..., or redis://...), else the broker's Redis.
    ``patience``: seconds a Redis store keeps retrying while Redis is away."""
    url = os.environ.get("CELERY_NB_BLOB_URL") or broker_url
    if url.startswith("s3://"):
        return S3BlobStore(url)
    return RedisBlobStore(url, patience=patience)


def _buffer(size: int) -> memoryview:
    """A zeroed buffer about to be filled. A bytearray would take a page fault for each 4 KiB;
    this one is in transparent huge pages where the system allows (a fault per 2 MiB: a
    100 MiB buffer filled in 20 ms instead of 55), else mapped in one go."""
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages in this kernel
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return memoryview(region)


def _chunks(pieces: list[Any], size: int) -> list[memoryview]:
    """Split the concatenation of ``pieces`` into views of at most ``size`` bytes (no copies
    except where a chunk spans two pieces)."""
    out: list[memoryview] = []
    pending: list[memoryview] = []
    pending_size = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view.nbytes:
            take = min(size - pending_size, view.nbytes)
            pending.append(view[:take])
            pending_size += take
            view = view[take:]
            if pending_size == size:
                out.append(pending[0] if len(pending) == 1 else memoryview(b"".join(pending)))
                pending, pending_size = [], 0
    if pending:
        out.append(pending[0] if len(pending) == 1 else memoryview(b"".join(pending)))
    return out


class RedisBlobStore:
    """Blobs in Redis, over redis-py's connections (TLS from rediss://, auth, database, socket and
    connect timeouts: what the URL says). ``patience``: seconds to keep retrying while Redis is
    away (see connect_redis)."""

    def __init__(self, url: str, ttl: int = DEFAULT_TTL, chunk_size: int = CHUNK_SIZE,
                 patience: float = DEFAULT_PATIENCE) -> None:
        self._retry = redis_retry(patience)
        # every call retries as a whole (a blob's read from its start), not each command within it
        self._redis = connect_redis(url, retry=Retry(NoBackoff(), 0))
        self._ttl = ttl
        self._chunk_size = chunk_size

    def put(self, pieces: list[Any], name: str | None = None) -> dict[str, Any]:
        """All chunks, pipelined, sent from the pieces as they are (no intermediate copies)."""
        key = f"celery_nb:blob:{name or uuid.uuid4().hex}"
        chunks = _chunks(pieces, self._chunk_size)
        self._retry.call_with_retry(lambda: self._put(key, chunks), lambda _error: None)
        return {"key": key, "size": sum(c.nbytes for c in chunks), "chunks": len(chunks)}

    @contextlib.contextmanager
    def _bulk_io(self, doing: str) -> Iterator[_BulkIO]:
        """A connection of the client's pool, driven by _BulkIO; back in the pool only if every
        reply was read. Any failure to reach Redis is a redis.ConnectionError, which the retry
        applies to."""
        pool = self._redis.connection_pool
        connection = None
        try:
            connection = pool.get_connection()
            bulk = _BulkIO(connection)
            yield bulk
            if bulk.pending:
                raise redis.ResponseError(f"Redis sent more than was asked while {doing}")
        except BaseException as exc:
            if connection is not None:
                connection.disconnect()  # replies may be left unread
            if isinstance(exc, (OSError, redis.ConnectionError, redis.TimeoutError)):
                raise redis.ConnectionError(f"lost Redis while {doing}: {exc}") from None
            raise
        finally:
            if connection is not None:
                pool.release(connection)

    def _put(self, key: str, chunks: list[memoryview]) -> None:
        with self._bulk_io(f"writing blob {key}") as conn:
            conn.send(*(("SET", f"{key}:{i}", chunk, "EX", str(self._ttl)) for i, chunk in enumerate(chunks)))
            for _ in chunks:
                reply = conn.read_line()
                if reply != b"+OK":
                    raise redis.ResponseError(f"Redis refused blob {key}: {reply.decode(errors='replace')}")

    def get(self, ref: dict[str, Any]) -> memoryview:
        """All chunks, pipelined, received straight into one buffer (no intermediate copies)."""
        return self._retry.call_with_retry(lambda: self._get(ref), lambda _error: None)

    def _get(self, ref: dict[str, Any]) -> memoryview:
        buffer = _buffer(ref["size"])
        with self._bulk_io(f"reading blob {ref['key']}") as conn:
            conn.send(*(("GET", f"{ref['key']}:{i}") for i in range(ref["chunks"])))
            pos = 0
            for _ in range(ref["chunks"]):
                size = conn.read_bulk_header()
                if size < 0:
                    raise MissingBlobError(f"blob {ref['key']} has expired or was deleted")
                conn.read_into(buffer[pos:pos + size])
                conn.read_line()  # the CRLF after the value
                pos += size
        return buffer

    def delete(self, ref: dict[str, Any]) -> None:
        keys = [f"{ref['key']}:{i}" for i in range(ref["chunks"])]
        self._retry.call_with_retry(lambda: self._redis.delete(*keys), lambda _error: None)

    def expire(self, ref: dict[str, Any], seconds: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for i in range(ref["chunks"]):
            pipe.expire(f"{ref['key']}:{i}", max(1, int(seconds)))
        pipe.execute()

    def touch(self, ref: dict[str, Any]) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        for i in range(ref["chunks"]):
            pipe.expire(f"{ref['key']}:{i}", self._ttl)
        return all(pipe.execute())


class _BulkIO:
    """Big values to and from Redis without copying them, over a connected redis-py connection
    (whatever TLS, auth, database and timeouts it was set up with): redis-py (with hiredis) packs
    each command into one bytes object, and builds a bytes object per reply, which it then
    copies again. Commands go out through the connection with the values as they are; replies
    are read from its socket, bulk ones straight into the caller's buffer."""

    def __init__(self, connection: redis.connection.Connection) -> None:
        self._connection = connection
        self._sock = connection._sock  # (redis-py's; tests/test_pinned.py checks it)
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received and not read yet."""
        return len(self._pending)

    def send(self, *commands: tuple[Any, ...]) -> None:
        """Commands of str and bytes-like arguments; big ones are written as they are."""
        pieces: list[Any] = []
        head = bytearray()
        for command in commands:
            head += b"*%d\r\n" % len(command)
            for arg in command:
                data = memoryview(arg.encode() if isinstance(arg, str) else arg).cast("B")
                head += b"$%d\r\n" % data.nbytes
                if data.nbytes < 65536:
                    head += data
                else:
                    pieces += [head, data]
                    head = bytearray()
                head += b"\r\n"
        self._connection.send_packed_command([*pieces, head], check_health=False)

    def read_line(self) -> bytes:
        while b"\r\n" not in self._pending:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection")
            self._pending += chunk
        line, _, rest = bytes(self._pending).partition(b"\r\n")
        self._pending = bytearray(rest)
        return line

    def read_bulk_header(self) -> int:
        line = self.read_line()
        if not line.startswith(b"$"):
            raise redis.ResponseError(line.decode(errors="replace"))
        return int(line[1:])

    def read_into(self, view: memoryview) -> None:
        take = min(len(self._pending), view.nbytes)
        view[:take] = self._pending[:take]
        del self._pending[:take]
        view = view[take:]
        while view.nbytes:
            received = self._sock.recv_into(view)
            if not received:
                raise redis.ConnectionError("Redis closed the connection")
            view = view[received:]


class S3BlobStore:
    """Blobs as objects under s3://BUCKET/PREFIX on S3 or any S3-compatible store (MinIO, Ceph,
    ...), uploaded and downloaded in parallel 8 MiB parts. The URL's query may set
    ``endpoint_url`` and ``region``; credentials come the usual boto3 way (AWS_ACCESS_KEY_ID
    and AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role). Objects have no expiry of their own:
    give the bucket a lifecycle rule for PREFIX (e.g. one day) for blobs never collected."""

    def __init__(self, url: str) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
        except ImportError:
            raise ImportError(f"CELERY_NB_BLOB_URL={url} needs boto3: pip install 'celery_nb[s3]'") from None
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self._bucket = parts.netloc
        self._prefix = parts.path.strip("/")
        self._s3 = boto3.client("s3", endpoint_url=query.get("endpoint_url"), region_name=query.get("region"))
        self._transfer = TransferConfig(multipart_threshold=CHUNK_SIZE, multipart_chunksize=CHUNK_SIZE,
                                        max_concurrency=8)

    def put(self, pieces: list[Any], name: str | None = None) -> dict[str, Any]:
        key = f"{self._prefix}/{name or uuid.uuid4().hex}".lstrip("/")
        reader = _PiecesReader(pieces)
        self._s3.upload_fileobj(reader, self._bucket, key, Config=self._transfer)
        return {"s3_key": key, "size": reader.size}

    def get(self, ref: dict[str, Any]) -> memoryview:
        """The object, downloaded in parallel parts straight into one buffer."""
        import botocore.exceptions

        buffer = _buffer(ref["size"])
        try:
            self._s3.download_fileobj(self._bucket, ref["s3_key"], _BufferWriter(buffer), Config=self._transfer)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise MissingBlobError(f"blob s3://{self._bucket}/{ref['s3_key']} has expired or was deleted") from None
            raise
        return buffer

    def delete(self, ref: dict[str, Any]) -> None:
        self._s3.delete_object(Bucket=self._bucket, Key=ref["s3_key"])

    def expire(self, ref: dict[str, Any], seconds: float) -> None:
        """Nothing: S3 objects expire by the bucket's lifecycle rule for PREFIX."""

    def touch(self, ref: dict[str, Any]) -> bool:
        """Whether the object is there (its lifecycle rule counts from its upload, not from now)."""
        import botocore.exceptions

        try:
            self._s3.head_object(Bucket=self._bucket, Key=ref["s3_key"])
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True


class _PiecesReader(io.RawIOBase):
    """The concatenation of bytes-like ``pieces`` as a readable file, without joining them."""

    def __init__(self, pieces: list[Any]) -> None:
        self._views = [memoryview(piece).cast("B") for piece in pieces]
        self.size = sum(view.nbytes for view in self._views)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        filled = 0
        while self._views and filled < out.nbytes:
            take = min(self._views[0].nbytes, out.nbytes - filled)
            out[filled:filled + take] = self._views[0][:take]
            filled += take
            self._views[0] = self._views[0][take:]
            if not self._views[0].nbytes:
                self._views.pop(0)
        return filled


class _BufferWriter(io.RawIOBase):
    """A seekable file writing into a preallocated buffer (parts may arrive in any order)."""

    def __init__(self, buffer: memoryview) -> None:
        self._buffer = buffer
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._buffer.nbytes}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._buffer[self._pos:self._pos + view.nbytes] = view
        self._pos += view.nbytes
        return view.nbytes


class MemoryBlobStore:
    """For the embedded worker: the bytes are handed over in the same process, not copied.
    Expired blobs go when the store is next used (no thread waits for each)."""

    def __init__(self) -> None:
        self._blobs: dict[str, Any] = {}
        self._deadlines: dict[str, float] = {}  # (monotonic) of the blobs that expire
        self._expiries: list[tuple[float, str]] = []  # the deadlines as set, a heap (a later one may replace one)
        self._lock = threading.Lock()

    def _drop_expired(self) -> None:
        """With the lock held."""
        now = time.monotonic()
        while self._expiries and self._expiries[0][0] <= now:
            deadline, key = heapq.heappop(self._expiries)
            if self._deadlines.get(key) == deadline:
                del self._deadlines[key], self._blobs[key]

    def put(self, pieces: list[Any], name: str | None = None) -> dict[str, Any]:
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        key = name or uuid.uuid4().hex
        with self._lock:
            self._drop_expired()
            self._blobs[key] = data
            self._deadlines.pop(key, None)  # as a Redis SET: a new blob does not expire
        return {"key": key, "size": memoryview(data).nbytes, "chunks": 1}

    def get(self, ref: dict[str, Any]) -> memoryview:
        with self._lock:
            self._drop_expired()
            if ref["key"] not in self._blobs:
                raise MissingBlobError(f"blob {ref['key']} was deleted")
            return memoryview(self._blobs[ref["key"]])

    def delete(self, ref: dict[str, Any]) -> None:
        with self._lock:
            self._blobs.pop(ref["key"], None)
            self._deadlines.pop(ref["key"], None)

    def expire(self, ref: dict[str, Any], seconds: float) -> None:
        with self._lock:
            if ref["key"] in self._blobs:
                self._deadlines[ref["key"]] = deadline = time.monotonic() + seconds
                heapq.heappush(self._expiries, (deadline, ref["key"]))
            self._drop_expired()

    def touch(self, ref: dict[str, Any]) -> bool:
        with self._lock:
            self._drop_expired()
            return ref["key"] in self._blobs

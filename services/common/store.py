"""The object store: one interface, a local-directory and an S3 implementation.

Keys are `/`-separated relative paths (see `keys`). Writes are atomic: a reader
sees either the whole old object, the whole new one, or nothing. Every operation
is counted in the `neurodissect_store_*` metrics.

Outages: the S3 store retries transient failures (connection errors, 5xx, SlowDown)
with exponential backoff and full jitter until `retry_s` seconds have passed since the
call's first failure, so a store that comes back within that time costs a pause, not a
job. `outage_since` says since when the store has been failing (None while it answers),
and `deadline(seconds)` bounds the retrying of the calls a thread makes inside it: a
caller that must answer quickly (a submission, a read for a client) fails fast instead.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np

from services.common import array_io
from services.common.errors import InvalidArgument, NotFound, StoreError
from services.common.metrics import STORE_BYTES, STORE_ERRORS, STORE_OPERATIONS

T = TypeVar("T")


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidArgument."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidArgument(f"bad object key {key!r}", field="key")
    if any(part in ("", ".", "..") for part in key.rstrip("/").split("/")):
        raise InvalidArgument(f"bad object key {key!r}", field="key")
    return key


class ObjectStore(abc.ABC):
    """Byte objects under string keys, plus JSON and array conveniences."""

    url: str
    # Monotonic time of the first failure of the current outage; None while the store answers.
    outage_since: float | None = None

    def probe(self) -> bool:
        """One quick check that the store answers (no retries); updates `outage_since`."""
        return True

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Within the body, this thread's calls give up retrying after `seconds`."""
        yield

    @abc.abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[str]: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    def _counted(self, operation: str, call: Callable[[], T]) -> T:
        STORE_OPERATIONS.labels(operation).inc()
        try:
            return call()
        except NotFound:
            raise
        except Exception:
            STORE_ERRORS.labels(operation).inc()
            raise

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any previous object atomically."""
        check_key(key)
        self._counted("put", lambda: self._put(key, data))
        STORE_BYTES.labels("put").inc(len(data))

    def get(self, key: str) -> bytes:
        """Return the bytes under `key`; NotFound if there are none."""
        check_key(key)
        data = self._counted("get", lambda: self._get(key))
        STORE_BYTES.labels("get").inc(len(data))
        return data

    def exists(self, key: str) -> bool:
        """Tell whether an object is stored under `key`."""
        check_key(key)
        return self._counted("exists", lambda: self._exists(key))

    def list(self, prefix: str) -> list[str]:
        """Return every key that starts with `prefix`, sorted."""
        if prefix:
            check_key(prefix)
        return sorted(self._counted("list", lambda: list(self._list(prefix))))

    def delete(self, key: str) -> None:
        """Remove the object under `key`; missing objects are not an error."""
        check_key(key)
        self._counted("delete", lambda: self._delete(key))

    def put_json(self, key: str, value: Any) -> None:
        """Store a JSON document."""
        self.put(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        """Load a JSON document."""
        return json.loads(self.get(key))

    def put_array(self, key: str, array: np.ndarray) -> None:
        """Store one array as .npy."""
        self.put(key, array_io.npy_bytes(array))

    def get_array(self, key: str) -> np.ndarray:
        """Load one .npy array."""
        return array_io.npy_array(self.get(key))

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
        """Store named arrays as .npz."""
        self.put(key, array_io.npz_bytes(arrays, compress=compress))

    def get_arrays(self, key: str) -> dict[str, np.ndarray]:
        """Load named arrays from .npz."""
        return array_io.npz_arrays(self.get(key))


class LocalStore(ObjectStore):
    """Objects as files under a root directory; writes go through a rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key!r} in {self.url}") from None

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store(ObjectStore):
    """Objects in an S3 bucket through the `minio` client.

    Puts stream through multipart uploads of `part_size` bytes. Transient errors
    (connection failures, 5xx, throttling) are retried with exponential backoff and full
    jitter for up to `retry_s` seconds; each attempt is bounded by the HTTP client's
    connect and read timeouts, and urllib3's own retries are off so that this loop alone
    decides.
    """

    FIRST_DELAY_S = 0.2
    MAX_DELAY_S = 10.0
    CONNECT_TIMEOUT_S = 5.0
    READ_TIMEOUT_S = 60.0

    _TRANSIENT_CODES = frozenset(
        {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted"}
    )

    def __init__(
        self,
        bucket: str,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str | None = None,
        prefix: str = "",
        retry_s: float = 900.0,
        part_size: int = 16 << 20,
    ) -> None:
        import urllib3
        from minio import Minio

        if not endpoint:
            raise InvalidArgument("an S3 store needs an endpoint (host:port)", field="s3_endpoint")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.retry_s = retry_s
        self.part_size = part_size
        self.url = f"s3://{bucket}/{self.prefix}"
        self._local = threading.local()
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=self.CONNECT_TIMEOUT_S, read=self.READ_TIMEOUT_S),
            retries=False,
            maxsize=16,
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region or "us-east-1",
            http_client=http,
        )
        self._retry(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)

    def _transient(self, exc: Exception) -> bool:
        from minio.error import S3Error, ServerError
        from urllib3.exceptions import HTTPError

        if isinstance(exc, S3Error):
            return exc.code in self._TRANSIENT_CODES
        return isinstance(exc, ServerError | HTTPError | ConnectionError | TimeoutError)

    def probe(self) -> bool:
        """One `bucket_exists` call, no retries: True if the store answered."""
        try:
            self.client.bucket_exists(self.bucket)
        except Exception as exc:
            if not self._transient(exc):
                raise StoreError(f"S3 {self.url}: {exc}") from exc
            self._failing()
            return False
        self.outage_since = None
        return True

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Within the body, this thread's calls give up retrying after `seconds`."""
        before = getattr(self._local, "retry_s", None)
        self._local.retry_s = seconds if before is None else min(before, seconds)
        try:
            yield
        finally:
            self._local.retry_s = before

    def _failing(self) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()

    def _retry(self, call: Callable[[], T]) -> T:
        budget = getattr(self._local, "retry_s", None)
        budget = self.retry_s if budget is None else budget
        first_failure: float | None = None
        delay = self.FIRST_DELAY_S
        while True:
            try:
                result = call()
            except NotFound:
                raise
            except Exception as exc:
                if not self._transient(exc):
                    raise StoreError(f"S3 {self.url}: {exc}") from exc
                self._failing()
                now = time.monotonic()
                first_failure = first_failure or now
                waited = now - first_failure
                if waited + delay > budget:
                    raise StoreError(
                        f"the object store {self.url} is unreachable (retried for "
                        f"{waited:.0f}s): {exc}"
                    ) from exc
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, self.MAX_DELAY_S)
                continue
            self.outage_since = None
            return result

    def _name(self, key: str) -> str:
        return self.prefix + key

    def _put(self, key: str, data: bytes) -> None:
        self._retry(
            lambda: self.client.put_object(
                self.bucket,
                self._name(key),
                io.BytesIO(data),
                length=-1,
                part_size=self.part_size,
            )
        )

    def _get(self, key: str) -> bytes:
        from minio.error import S3Error

        def fetch() -> bytes:
            try:
                response = self.client.get_object(self.bucket, self._name(key))
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    raise NotFound(f"no object {key!r} in {self.url}") from None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry(fetch)

    def _exists(self, key: str) -> bool:
        from minio.error import S3Error

        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, self._name(key))
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise
            return True

        return self._retry(stat)

    def _list(self, prefix: str) -> Iterator[str]:
        names = self._retry(
            lambda: [
                obj.object_name
                for obj in self.client.list_objects(
                    self.bucket, prefix=self._name(prefix), recursive=True
                )
            ]
        )
        for name in names:
            if name is not None:
                yield name[len(self.prefix) :]

    def _delete(self, key: str) -> None:
        self._retry(lambda: self.client.remove_object(self.bucket, self._name(key)))


def open_store(
    url: str,
    endpoint: str = "",
    access_key: str = "",
    secret_key: str = "",
    secure: bool = False,
    region: str | None = None,
    retry_s: float = 900.0,
) -> ObjectStore:
    """Open the store at `url`: `file://PATH` (relative paths allowed) or `s3://bucket[/prefix]`.

    `retry_s`: how long an S3 call retries transient failures before it fails.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(parsed.netloc + parsed.path if parsed.netloc else parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidArgument(f"{url!r} names no bucket", field="store_url")
        return S3Store(
            parsed.netloc,
            endpoint,
            access_key,
            secret_key,
            secure=secure,
            region=region or "us-east-1",
            prefix=parsed.path,
            retry_s=retry_s,
        )
    raise InvalidArgument(
        f"unsupported store URL {url!r}; use file://PATH or s3://BUCKET", field="store_url"
    )

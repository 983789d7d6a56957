"""The lake's S3 backend: the ``Store`` protocol of ``tasks.lake.storage`` over boto3.

Works with AWS and any S3-compatible server (SeaweedFS, MinIO, Ceph...). Settings come from the
standard AWS places, read when the store first talks to S3, never at import:

- endpoint: the constructor's ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
  else the profile's configuration, else AWS itself;
- region: the constructor's ``region``, else ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile,
  else ``us-east-1`` (S3-compatible servers ignore it, but polars needs one);
- credentials: boto3's chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, the ``profile`` or ``AWS_PROFILE``, instance roles...).

Throttling, 5xx answers, timeouts and dropped connections are retried by botocore's "standard"
mode: ``max_attempts`` tries in all, with jittered exponential backoff (base 1 s for throttling,
50 ms otherwise, capped at 20 s). So a stopped server fails in about a second, an unroutable host
within ~15 s (3 s connect timeout x 5), a server that accepts connections but never answers within
~75 s (15 s read timeout x 5); outages longer than that are for the Prefect task retries around
the lake's callers. Failures a person must fix become one
``LakeAccessError`` sentence naming the URI or endpoint and the fix; credential values never appear
in messages or reprs. A missing object raises ``FileNotFoundError``, which the lake relies on.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

T = TypeVar("T")
# One boto3 session and client per distinct settings, shared by every S3Store in the process:
# building a client costs ~300 ms, and tasks open a Lake per call. The key includes the AWS_*
# variables, so changed credentials or endpoints get a new client.
_CLIENTS: dict[str, tuple[Any, Any]] = {}
_CLIENTS_LOCK = threading.Lock()

DEFAULT_REGION = "us-east-1"
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call accepts
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}
_BARE_CODES = {"403", "404", "Forbidden", "NotFound"}  # HEAD answers: a status without a reason


class LakeAccessError(OSError):
    """The lake's object store refused or could not serve a request; the message says what to fix."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key has no leading or trailing slash."""
    if not uri.startswith("s3://"):
        raise ValueError(f"Not an S3 URI: {uri!r} (expected s3://BUCKET/KEY).")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} names no bucket (expected s3://BUCKET/KEY).")
    return bucket, key.strip("/")


class S3Store:
    """Objects in S3 addressed by full ``s3://bucket/key`` URIs.

    ``put`` is atomic per object (S3 never shows a partial object); ``list`` is recursive and sorted.
    Directory-like calls (``list``, ``delete_prefix``) treat the prefix as a folder: they act on keys
    under ``prefix + "/"`` only, never on siblings such as ``prefix2``. The boto3 client is made on
    first use and kept for the store's lifetime; it is thread-safe.
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        *,
        max_attempts: int = 5,
        connect_timeout: float = 3.0,
        read_timeout: float = 15.0,
    ):
        self._endpoint_url = endpoint_url
        self._region = region
        self._profile = profile
        self._max_attempts = max_attempts
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._session: boto3.session.Session | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # settings only, never credentials
        if self._client is None:
            return f"S3Store(endpoint_url={self._endpoint_url!r}, region={self._region!r}, profile={self._profile!r})"
        return f"S3Store(endpoint_url={self.endpoint_url!r}, region={self.region!r}, profile={self._profile!r})"

    # -- the Store protocol ------------------------------------------------------------------
    def put(self, uri: str, data: bytes) -> None:
        """Write one object, replacing any object at ``uri``."""
        bucket, key = split_uri(uri)
        self._call(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data))

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """Create the object unless one exists (``If-None-Match: *``); False if one did.

        AWS S3 and SeaweedFS honour the condition; a server that ignores it would overwrite.
        """
        bucket, key = split_uri(uri)
        return self._conditional(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"))

    def put_if_unchanged(self, uri: str, data: bytes, expected: bytes) -> bool:
        """Replace the object only if it still holds ``expected`` (``If-Match`` on the ETag read); False otherwise."""
        bucket, key = split_uri(uri)
        try:
            answer = self._call(uri, lambda: self.client.get_object(Bucket=bucket, Key=key))
            current, etag = answer["Body"].read(), answer["ETag"]
        except FileNotFoundError:
            return False
        if current != expected:
            return False
        return self._conditional(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag))

    def _conditional(self, uri: str, request: Callable[[], Any]) -> bool:
        """Run a conditional write: True if it was made, False if its condition did not hold."""

        def attempt() -> bool:
            try:
                request()
            except ClientError as exc:
                # 412: the condition failed; 409: a concurrent conditional write to the key won.
                if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return False
                raise
            return True

        return self._call(uri, attempt)

    def get(self, uri: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` if there is none (a missing bucket is a ``LakeAccessError``)."""
        bucket, key = split_uri(uri)
        return self._call(uri, lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def exists(self, uri: str) -> bool:
        """Whether an object (not a folder) is at ``uri``."""
        bucket, key = split_uri(uri)
        try:
            self._call(uri, lambda: self.client.head_object(Bucket=bucket, Key=key))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        """Full URIs of every object under the folder ``prefix``, at any depth, sorted."""
        bucket, _ = split_uri(prefix)
        return sorted(f"s3://{bucket}/{key}" for key in self._keys(prefix))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under the folder ``prefix`` (never the whole bucket, never siblings)."""
        bucket, key = split_uri(prefix)
        if not key:
            raise ValueError(f"Refusing to delete every object in bucket '{bucket}': delete_prefix needs a key prefix.")
        keys = list(self._keys(prefix))
        for start in range(0, len(keys), _DELETE_BATCH):
            self._delete_batch(prefix, keys[start : start + _DELETE_BATCH])

    def move(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst`` inside the server (the new object appears whole), then delete ``src``."""
        bucket, key = split_uri(src)
        dst_bucket, dst_key = split_uri(dst)
        self._call(dst, lambda: self.client.copy_object(Bucket=dst_bucket, Key=dst_key, CopySource={"Bucket": bucket, "Key": key}))
        self._call(src, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def size(self, uri: str) -> int:
        """The object's size in bytes; ``FileNotFoundError`` if there is none."""
        bucket, key = split_uri(uri)
        return int(self._call(uri, lambda: self.client.head_object(Bucket=bucket, Key=key))["ContentLength"])

    def put_file(self, local_path: str | Path, uri: str) -> None:
        """Upload a local file (multipart for large files)."""
        bucket, key = split_uri(uri)
        self._call(uri, lambda: self.client.upload_file(str(local_path), bucket, key))

    def get_file(self, uri: str, local_path: str | Path) -> None:
        """Download to ``local_path`` (boto3 writes a temporary file and renames it into place)."""
        bucket, key = split_uri(uri)
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._call(uri, lambda: self.client.download_file(bucket, key, str(local_path)))

    def local_path(self, uri: str) -> Path | None:
        """S3 objects have no local path."""
        return None

    def storage_options(self) -> dict[str, str]:
        """What polars' ``scan_parquet``/``read_parquet`` need to read this store's URIs.

        The dict CONTAINS THE SECRET KEY (and session token): pass it straight to the reader and
        never log, print or persist it. ``aws_endpoint_url`` is set only for non-AWS endpoints.
        """
        session, _ = self._connect()
        credentials = session.get_credentials()
        if credentials is None:
            raise LakeAccessError(_no_credentials_message("this lake"))
        frozen = credentials.get_frozen_credentials()
        options = {
            "aws_region": self.region,
            "aws_access_key_id": frozen.access_key,
            "aws_secret_access_key": frozen.secret_key,
        }
        if frozen.token:
            options["aws_session_token"] = frozen.token
        if not _is_aws_endpoint(self.endpoint_url):
            options["aws_endpoint_url"] = self.endpoint_url
        return options

    # -- settings ----------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe), created on first use."""
        return self._connect()[1]

    @property
    def endpoint_url(self) -> str:
        return self.client.meta.endpoint_url

    @property
    def region(self) -> str:
        return self.client.meta.region_name

    def _connect(self) -> tuple[boto3.session.Session, Any]:
        """The boto3 session and S3 client, made (and the AWS settings read) on first use."""
        with self._lock:
            if self._session is None or self._client is None:
                key = self._cache_key()
                with _CLIENTS_LOCK:
                    if key not in _CLIENTS:
                        session = self._new_session()
                        _CLIENTS[key] = (session, self._new_client(session))
                    self._session, self._client = _CLIENTS[key]
            return self._session, self._client

    def _cache_key(self) -> str:
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE")
        parts = [self._endpoint_url, self._region, self._profile, self._max_attempts, self._connect_timeout,
                 self._read_timeout, *(os.environ.get(n) for n in names)]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def _new_session(self) -> boto3.session.Session:
        try:
            return boto3.session.Session(profile_name=self._profile)
        except ProfileNotFound:
            raise LakeAccessError(
                f"The AWS profile {self._profile!r} is not configured: add it to ~/.aws/config or fix the lake's profile."
            ) from None

    def _new_client(self, session: boto3.session.Session) -> Any:
        endpoint = self._endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = self._region or os.environ.get("AWS_REGION") or session.region_name or DEFAULT_REGION
        config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": self._max_attempts},
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            # Path-style addressing for S3-compatible servers: bucket.127.0.0.1 is not a host name.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        return session.client("s3", endpoint_url=endpoint or None, config=config)

    # -- helpers -----------------------------------------------------------------------------
    def _keys(self, prefix: str) -> Iterator[str]:
        """Every object key under the folder ``prefix`` (all of the bucket for ``s3://bucket``)."""
        bucket, key = split_uri(prefix)
        folder = f"{key}/" if key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(prefix, lambda: list(paginator.paginate(Bucket=bucket, Prefix=folder)))
        for page in pages:
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):  # folder markers some tools and servers create
                    yield item["Key"]

    def _delete_batch(self, prefix: str, keys: list[str]) -> None:
        """Delete up to 1000 keys of ``prefix``'s bucket in one request; any per-key failure is an error."""
        bucket, _ = split_uri(prefix)
        objects = {"Objects": [{"Key": key} for key in keys], "Quiet": True}
        answer = self._call(prefix, lambda: self.client.delete_objects(Bucket=bucket, Delete=objects))
        errors = answer.get("Errors", [])
        if errors:
            first = errors[0]
            raise LakeAccessError(
                f"S3 could not delete {len(errors)} objects under {prefix}, "
                f"e.g. s3://{bucket}/{first.get('Key')} ({first.get('Code')}: {first.get('Message')})."
            )

    def _call(self, uri: str, request: Callable[[], T]) -> T:
        """Run one request against ``uri``, turning failures into ``FileNotFoundError`` or ``LakeAccessError``."""
        failure: ClientError | BotoCoreError
        try:
            return request()
        except (S3UploadFailedError, RetriesExceededError) as exc:  # boto3's transfer wrappers
            cause = getattr(exc, "last_exception", None) or exc.__context__
            if not isinstance(cause, (ClientError, BotoCoreError)):
                raise LakeAccessError(f"S3 transfer for {uri} failed: {exc}") from exc
            failure = cause
        except (ClientError, BotoCoreError) as exc:
            failure = exc
        translated = self._translate(failure, uri)
        raise translated from (None if isinstance(translated, FileNotFoundError) else failure)

    def _translate(self, exc: ClientError | BotoCoreError, uri: str) -> OSError:
        """One error a person can act on, for a botocore failure on ``uri``."""
        bucket, _ = split_uri(uri)
        if isinstance(exc, ClientError) and _code(exc) in _BARE_CODES:
            exc = self._probe(uri) or exc
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return LakeAccessError(f"Cannot reach the S3 endpoint {self.endpoint_url}: is the server running?")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return LakeAccessError(_no_credentials_message(uri))
        if not isinstance(exc, ClientError):
            return LakeAccessError(f"S3 request for {uri} failed: {exc}")
        code = _code(exc)
        if code in _CREDENTIAL_CODES:
            return LakeAccessError(
                f"S3 refused the credentials for {uri}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                " (and AWS_SESSION_TOKEN or the AWS profile, if you use them)."
            )
        if code == "NoSuchBucket":
            return LakeAccessError(f"Bucket '{bucket}' does not exist at {self.endpoint_url}: create it or fix the lake URI.")
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"No object at {uri}.")
        if code in ("AccessDenied", "403", "Forbidden"):
            return LakeAccessError(f"S3 denied access to {uri}: the credentials work but lack permission for this request.")
        message = str(exc.response.get("Error", {}).get("Message", "")).rstrip(".")
        return LakeAccessError(f"S3 request for {uri} failed with {code or 'an error'}" + (f": {message}." if message else "."))

    def _probe(self, uri: str) -> ClientError | BotoCoreError | None:
        """The precise failure behind a body-less HEAD 403/404, from one listing of the same key; None if it works.

        A HEAD answer has no body, so its bare status cannot tell a missing key from a missing bucket,
        or bad credentials from a missing permission; a ListObjectsV2 answer names the reason.
        """
        bucket, key = split_uri(uri)
        try:
            self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            return exc
        return None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_aws_endpoint(endpoint_url: str) -> bool:
    host = endpoint_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def _no_credentials_message(where: str) -> str:
    return (
        f"No AWS credentials found for {where}: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
        "or choose a configured AWS profile."
    )

"""A content store in an S3 bucket (AWS, MinIO, SeaweedFS): ``<prefix>blobs/sha256/<hex>``.

Ingest streams with bounded memory: bytes are hashed (sha256) and counted as they arrive and
collected into part buffers of ``part_size``. A blob that fits in one part is held until commit
and, once its digest is verified, PUT straight to its final key with ``If-None-Match: *`` and an
``x-amz-checksum-sha256`` the server checks (no temporary object at all). A larger blob becomes a
multipart upload to ``<prefix>uploads/<uuid>`` (at most ``max_in_flight_parts`` parts uploading
while the next one fills); at commit the digest is checked locally first (a mismatch aborts the
upload, nothing is ever completed), then the temporary object is completed and server-side copied
to the final key with ``If-None-Match: *`` (a multipart ``UploadPartCopy`` beyond 5 GiB), and
deleted. A 412 means the blob is already there: success. So a key under ``blobs/`` only ever
appears whole and with the bytes its name promises.

Reads are verified (:mod:`blobchain.storage.content.verified`): an object whose bytes do not hash
to its key's digest (overwritten by another client, damaged by the server) raises DigestMismatch
and is moved to ``<prefix>quarantine/sha256/<hex>.<time>`` (copied there, conditional on the ETag
that was read, then deleted from ``blobs/``). Every object we write carries its sha256 in
``x-amz-meta-blobchain-sha256``; an object without it (or with another value) was not written by
blobchain, so ``verify(quick=True)`` reads it whole. Temporary uploads are named
``uploads/<tag>-<uuid>`` with the ingest ref's tag, so a new holder of a ref sweeps a dead
holder's uploads at once.

Labels (``containerd.io/uncompressed``) are kept as user metadata ``x-amz-meta-label-<name>``;
names are escaped to lowercase-safe ASCII (S3 metadata keys are case-insensitive ASCII header
tokens), values percent-encoded. This is the only module that imports boto3/botocore.
"""

from __future__ import annotations

import base64
import io
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, BinaryIO, cast
from urllib.parse import quote, unquote

import boto3
import botocore.exceptions as bexc
from botocore.config import Config
from tenacity import Retrying, retry_if_result, stop_after_attempt, wait_exponential

from blobchain.layers.errors import (
    BlobchainError,
    Conflict,
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    register,
)
from blobchain.layers.records import check_digest
from blobchain.storage.content import BlobInfo, ingest_tag
from blobchain.storage.content.ingest import IngestBase
from blobchain.storage.content.verified import VerifyingReader, drain_verified

__all__ = ["S3AccessDenied", "S3ContentStore", "S3Ingest", "decode_labels", "encode_labels", "make_s3_client"]

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
MIN_PART = 5 * MiB  # S3's minimum for every part but the last
MAX_COPY = 5 * GiB  # largest single-request CopyObject
_COPY_PART = 512 * MiB
_LABEL_META = "label-"
_SHA_META = "blobchain-sha256"  # the content's sha256 hex, set by our writes only
_META_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")
_VALUE_SAFE = "!\"#$&'()*+,/:;<=>?@[\\]^_`{|}~"  # printable ASCII but space and '%'
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
    }
)
_RETRY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"})


@register
class S3AccessDenied(FailedPrecondition):
    """The endpoint rejected our credentials or permissions; fix the configuration, don't retry."""

    code = "s3_access_denied"


def make_s3_client(
    endpoint: str,
    region: str,
    access_key: str | None,
    secret_key: str | None,
    *,
    verify_tls: bool = True,
    ca_bundle: str | None = None,
    max_attempts: int = 5,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 16,
) -> Any:
    """A boto3 S3 client set up for S3-compatible servers (path style, SigV4, standard retries).

    Checksums are ``when_required``: botocore >= 1.36 otherwise sends aws-chunked trailers over
    HTTPS that several S3-compatible servers mishandle; integrity is our own sha256.
    ``max_attempts`` counts the first try (1 = no retries).
    """
    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        verify=ca_bundle if ca_bundle else verify_tls,
        config=config,
    )


# --- labels <-> user metadata ---------------------------------------------------------------


def _encode_name(name: str) -> str:
    out = []
    for ch in name:
        if ch in _META_SAFE:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return _LABEL_META + "".join(out)


def _decode_name(meta: str) -> str:
    raw = bytearray()
    s = meta[len(_LABEL_META) :]
    i = 0
    while i < len(s):
        if s[i] == "_":
            raw.append(int(s[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += s[i].encode()
            i += 1
    return raw.decode()


def encode_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels -> S3 user metadata (``label-`` + escaped name -> percent-encoded value)."""
    return {_encode_name(k): quote(v, safe=_VALUE_SAFE) for k, v in labels.items()}


def decode_labels(meta: Mapping[str, str]) -> dict[str, str]:
    return {_decode_name(k.lower()): unquote(v) for k, v in meta.items() if k.lower().startswith(_LABEL_META)}


# --- the store ------------------------------------------------------------------------------

# What _call returns instead of raising, when the caller asked: 404, 412, 409 (concurrent write).
_ABSENT = object()
_EXISTS = object()
_CONFLICT = object()
_CONFLICT_ATTEMPTS = 5


class S3ContentStore:
    """:class:`blobchain.storage.content.ContentStore` on an S3 bucket (boto3 client passed in)."""

    cheap_labels = False  # labels are object metadata: changing them copies the object
    layout_root = None  # not a directory

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = 8 * MiB,
        max_in_flight_parts: int = 2,
        multipart_copy_threshold: int = MAX_COPY,
    ) -> None:
        if not MIN_PART <= part_size <= MAX_COPY:
            raise InvalidArgument(f"part_size must be between 5 MiB and 5 GiB (got {part_size})")
        if max_in_flight_parts < 1:
            raise InvalidArgument(f"max_in_flight_parts must be >= 1 (got {max_in_flight_parts})")
        if not MIN_PART <= multipart_copy_threshold <= MAX_COPY:
            raise InvalidArgument("multipart_copy_threshold must be between 5 MiB and 5 GiB")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.part_size = part_size
        self.max_in_flight_parts = max_in_flight_parts
        # Objects above this are copied with UploadPartCopy (5 GiB is S3's CopyObject limit;
        # lower values let tests exercise the multipart copy path).
        self.multipart_copy_threshold = multipart_copy_threshold

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def __repr__(self) -> str:
        return f"S3ContentStore(endpoint={self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    # --- keys ---------------------------------------------------------------------------------

    def blob_key(self, digest: str) -> str:
        return f"{self.prefix}blobs/sha256/{check_digest(digest)[7:]}"

    @property
    def uploads_prefix(self) -> str:
        return f"{self.prefix}uploads/"

    @property
    def quarantine_prefix(self) -> str:
        return f"{self.prefix}quarantine/sha256/"

    # --- reading ------------------------------------------------------------------------------

    def info(self, digest: str) -> BlobInfo | None:
        head = self._head(self.blob_key(digest))
        if head is None:
            return None
        return _info(digest, head)

    def open(self, digest: str, offset: int = 0, *, quarantine: bool = True) -> BinaryIO:
        key = self.blob_key(digest)
        # From ``offset`` (a resumed registry upload sends only what is left), the bytes before
        # it are still fetched and hashed, not returned: a ranged GET could not be verified.
        resp = self._call("get_object", absent_ok=True, Bucket=self.bucket, Key=key)
        if resp is _ABSENT:
            raise NotFound(f"blob {digest} not found in s3://{self.bucket}/{key}", digest=digest)
        etag = resp.get("ETag")

        def bad_copy(err: DigestMismatch) -> str | None:
            return self._quarantine_if(digest, etag, err.message)

        raw = VerifyingReader(
            _BodyReader(resp["Body"], self, key),
            digest,
            size=int(resp["ContentLength"]) if "ContentLength" in resp else None,
            where=f"object s3://{self.bucket}/{key}",
            on_mismatch=bad_copy if quarantine else None,
            skip=offset,
        )
        return cast(BinaryIO, io.BufferedReader(raw, buffer_size=MiB))

    def verify(self, digest: str, *, quick: bool = False, quarantine: bool = True) -> BlobInfo | None:
        key = self.blob_key(digest)
        head = self._head(key)
        if head is None:
            return None
        if quick and _marker(head) == digest[7:]:
            return _info(digest, head)
        info = drain_verified(self, digest, quarantine=quarantine)
        if info is not None and _marker(head) != digest[7:]:
            # Intact but unmarked (written before markers, or restored by hand): mark it, only
            # if it is still the object we read.
            meta = {**encode_labels(dict(info.labels)), _SHA_META: digest[7:]}
            self._copy(key, key, info.size, meta, if_none_match=False, source_etag=head.get("ETag"))
        return info

    def quarantine(self, digest: str, *, reason: str = "") -> str | None:
        head = self._head(self.blob_key(digest))
        if head is None:
            return None
        return self._quarantine_if(digest, head.get("ETag"), reason)

    def quarantined(self) -> Iterator[str]:
        found: list[tuple[Any, str]] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.quarantine_prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kw)
            found += [(o["LastModified"], o["Key"]) for o in page.get("Contents") or ()]
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return iter([f"s3://{self.bucket}/{key}" for _, key in sorted(found)])

    def _quarantine_if(self, digest: str, etag: str | None, reason: str) -> str | None:
        """Copy the object to ``quarantine/`` if it is still the one read (``etag``), then
        delete it from ``blobs/``. S3 has no conditional delete: a good copy published in the
        instant between the copy and the delete would be removed (and rebuilt later)."""
        key = self.blob_key(digest)
        head = self._head(key)
        if head is None or (etag is not None and head.get("ETag") != etag):
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = f"{self.quarantine_prefix}{digest[7:]}.{stamp}.{uuid.uuid4().hex[:8]}"
        meta = {"quarantine-reason": quote(reason[:1000], safe=_VALUE_SAFE)} if reason else {}
        if not self._copy(key, dest, int(head["ContentLength"]), meta, if_none_match=True, source_etag=etag):
            return None
        self._call("delete_object", Bucket=self.bucket, Key=key)
        return f"s3://{self.bucket}/{dest}"

    def list_digests(self) -> Iterator[str]:
        base = f"{self.prefix}blobs/sha256/"
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kw)
            for obj in page.get("Contents") or ():
                hexpart = obj["Key"][len(base) :]
                if len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart):
                    yield f"sha256:{hexpart}"
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    # --- writing ------------------------------------------------------------------------------

    def ingest(self, ref: str) -> S3Ingest:
        return S3Ingest(self, ref)

    def delete(self, digest: str) -> bool:
        key = self.blob_key(digest)
        if self._head(key) is None:
            return False
        self._call("delete_object", Bucket=self.bucket, Key=key)
        return True

    def set_labels(self, digest: str, labels: Mapping[str, str]) -> BlobInfo:
        """Merge labels by copying the object onto itself with new metadata.

        The copy replaces the object atomically (readers see old or new metadata, always the
        same bytes) and is conditional on the ETag read (``CopySourceIfMatch``), retried on a
        concurrent change, so two writers cannot drop each other's labels on servers honouring
        that condition. On versioned buckets each call leaves a new version.
        """
        key = self.blob_key(digest)
        for _ in range(8):
            head = self._head(key)
            if head is None:
                raise NotFound(f"blob {digest} not found in s3://{self.bucket}/{key}", digest=digest)
            have = decode_labels(head.get("Metadata") or {})
            merged = {**have, **labels}
            size = int(head["ContentLength"])
            if merged == have:
                return _info(digest, head)
            meta = encode_labels(merged)
            if (marker := _marker(head)) is not None:
                meta[_SHA_META] = marker  # kept as it was: a relabel must not vouch for bytes
            done = self._copy(key, key, size, meta, if_none_match=False, source_etag=head.get("ETag"))
            if done:
                return BlobInfo(digest, size, merged, created=datetime.now(UTC).timestamp())
        raise Conflict(f"labels of blob {digest} kept changing concurrently", digest=digest)

    def sweep(self, older_than_s: float, *, ref: str | None = None) -> int:
        """Abort multipart uploads and delete ``uploads/`` objects older than the given age
        (only ingest ``ref``'s, if given)."""
        cutoff = datetime.now(UTC).timestamp() - older_than_s
        mine = self.uploads_prefix if ref is None else f"{self.uploads_prefix}{ingest_tag(ref)}-"
        removed = 0
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix if ref is None else mine}
        while True:
            page = self._call("list_multipart_uploads", **kw)
            for up in page.get("Uploads") or ():
                if ref is None:
                    ours = up["Key"].startswith((self.uploads_prefix, f"{self.prefix}blobs/"))
                else:
                    ours = up["Key"].startswith(mine)
                if ours and up["Initiated"].timestamp() < cutoff:
                    self._call(
                        "abort_multipart_upload",
                        absent_ok=True,
                        Bucket=self.bucket,
                        Key=up["Key"],
                        UploadId=up["UploadId"],
                    )
                    removed += 1
            if not page.get("IsTruncated"):
                break
            kw["KeyMarker"] = page.get("NextKeyMarker")
            kw["UploadIdMarker"] = page.get("NextUploadIdMarker")
        token: str | None = None
        while True:
            lkw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": mine}
            if token:
                lkw["ContinuationToken"] = token
            page = self._call("list_objects_v2", **lkw)
            for obj in page.get("Contents") or ():
                if obj["LastModified"].timestamp() < cutoff:
                    self._call("delete_object", Bucket=self.bucket, Key=obj["Key"])
                    removed += 1
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return removed

    # --- internals ----------------------------------------------------------------------------

    def sweep_orphans(self) -> int:
        # An upload's writer may run on any host: whether it is alive is not knowable here. A
        # new claim holder sweeps a dead holder's uploads (``sweep(ref=...)``), GC the old ones.
        return 0

    def pinned(self) -> set[str]:
        return set()  # no layout index in the bucket: the records and manifests are the roots

    def _head(self, key: str) -> dict[str, Any] | None:
        resp = self._call("head_object", absent_ok=True, Bucket=self.bucket, Key=key)
        return None if resp is _ABSENT else cast(dict[str, Any], resp)

    def _put_if_absent(self, key: str, body: bytes | bytearray, digest: str, meta: dict[str, str]) -> bool:
        """PUT with If-None-Match: *; False if the key already exists."""
        checksum = base64.b64encode(bytes.fromhex(digest[7:])).decode()
        return self._settled(
            key,
            lambda: self._call(
                "put_object",
                exists_ok=True,
                Bucket=self.bucket,
                Key=key,
                Body=body,
                IfNoneMatch="*",
                Metadata=meta,
                ContentType="application/octet-stream",
                ChecksumSHA256=checksum,
            ),
        )

    def _settled(self, key: str, write: Callable[[], Any]) -> bool:
        """Run a conditional write until S3 stops answering 409 (another write on ``key`` in
        flight): True if written, False if the condition failed (412)."""
        retrying = Retrying(
            retry=retry_if_result(lambda resp: resp is _CONFLICT),
            stop=stop_after_attempt(_CONFLICT_ATTEMPTS),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry_error_callback=lambda state: _CONFLICT,
        )
        resp = retrying(write)
        if resp is _CONFLICT:
            raise Unavailable(f"S3 at {self.endpoint} kept reporting a conflicting write on {key}")
        return resp is not _EXISTS

    def _copy(
        self,
        src: str,
        dst: str,
        size: int,
        meta: dict[str, str],
        *,
        if_none_match: bool,
        source_etag: str | None = None,
    ) -> bool:
        """Server-side copy with new metadata; False if the condition failed (412)."""
        cond: dict[str, Any] = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"

        def copy() -> Any:
            if size > self.multipart_copy_threshold:
                return self._copy_multipart(src, dst, size, meta, cond, source_etag)
            src_cond: dict[str, Any] = {"CopySourceIfMatch": source_etag} if source_etag else {}
            return self._call(
                "copy_object",
                exists_ok=True,
                Bucket=self.bucket,
                Key=dst,
                CopySource={"Bucket": self.bucket, "Key": src},
                MetadataDirective="REPLACE",
                Metadata=meta,
                ContentType="application/octet-stream",
                **src_cond,
                **cond,
            )

        return self._settled(dst, copy)

    def _copy_multipart(
        self,
        src: str,
        dst: str,
        size: int,
        meta: dict[str, str],
        cond: dict[str, Any],
        source_etag: str | None,
    ) -> Any:
        up = self._call(
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=dst,
            Metadata=meta,
            ContentType="application/octet-stream",
        )
        upload_id = up["UploadId"]
        try:
            parts = []
            src_cond: dict[str, Any] = {"CopySourceIfMatch": source_etag} if source_etag else {}
            step = _copy_part_size(size, self.multipart_copy_threshold)
            for n, start in enumerate(range(0, size, step), 1):
                end = min(size, start + step) - 1
                r = self._call(
                    "upload_part_copy",
                    exists_ok=True,
                    Bucket=self.bucket,
                    Key=dst,
                    UploadId=upload_id,
                    PartNumber=n,
                    CopySource={"Bucket": self.bucket, "Key": src},
                    CopySourceRange=f"bytes={start}-{end}",
                    **src_cond,
                )
                if r is _EXISTS:  # the source changed under us (set_labels race)
                    self._abort_upload(dst, upload_id)
                    return _EXISTS
                parts.append({"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]})
            resp = self._call(
                "complete_multipart_upload",
                exists_ok=True,
                Bucket=self.bucket,
                Key=dst,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **cond,
            )
        except BaseException:
            self._abort_upload(dst, upload_id)
            raise
        if resp is _EXISTS or resp is _CONFLICT:
            self._abort_upload(dst, upload_id)
        return resp

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                "abort_multipart_upload", absent_ok=True, Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except BlobchainError as e:  # the sweeper will get it
            log.warning("could not abort multipart upload of %s: %s", key, e)

    def _delete_quietly(self, key: str) -> None:
        try:
            self._call("delete_object", Bucket=self.bucket, Key=key)
        except BlobchainError as e:
            log.warning("could not delete temporary object %s (sweep will): %s", key, e)

    def _call(self, op: str, *, absent_ok: bool = False, exists_ok: bool = False, **kw: Any) -> Any:
        """Run one client call; map errors. 404 -> _ABSENT / 412 -> _EXISTS / 409 -> _CONFLICT if asked."""
        try:
            return getattr(self.client, op)(**kw)
        except bexc.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(e.response.get("Error", {}).get("Code", ""))
            # A missing bucket is also a 404, but never "absent": it is named (FailedPrecondition).
            if (
                absent_ok
                and code != "NoSuchBucket"
                and (status == 404 or code in ("404", "NoSuchKey", "NoSuchUpload"))
            ):
                return _ABSENT
            if exists_ok and (status == 412 or code == "PreconditionFailed"):
                return _EXISTS
            if exists_ok and code == "ConditionalRequestConflict":
                return _CONFLICT
            raise self._map_client_error(e, op, kw.get("Key"), status, code) from e
        except bexc.ParamValidationError as e:
            raise InvalidArgument(f"S3 {op}: {e}") from e
        except (bexc.NoCredentialsError, bexc.PartialCredentialsError) as e:
            raise S3AccessDenied(f"no usable S3 credentials for {self.endpoint}: {e}") from e
        except bexc.SSLError as e:
            raise FailedPrecondition(f"TLS failure talking to S3 at {self.endpoint}: {e}") from e
        except bexc.BotoCoreError as e:
            raise self._unavailable(op, kw.get("Key"), e) from e

    def _unavailable(self, op: str, key: str | None, e: BaseException) -> Unavailable:
        where = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        return Unavailable(
            f"S3 endpoint {self.endpoint} unavailable during {op} on {where}: {e}",
            endpoint=self.endpoint,
            bucket=self.bucket,
        )

    def _map_client_error(
        self, e: bexc.ClientError, op: str, key: str | None, status: int | None, code: str
    ) -> BlobchainError:
        msg = str(e.response.get("Error", {}).get("Message", "")) or code
        where = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        if code in _AUTH_CODES or status == 403:
            return S3AccessDenied(
                f"S3 endpoint {self.endpoint} denied {op} on {where}: {code}: {msg} "
                "(check the access key, secret key and bucket policy)",
                endpoint=self.endpoint,
                bucket=self.bucket,
                code=code,
            )
        if (status is not None and status >= 500) or code in _RETRY_CODES:
            return self._unavailable(op, key, e)
        if code == "NoSuchBucket":
            return FailedPrecondition(
                f"bucket {self.bucket} does not exist at {self.endpoint}", bucket=self.bucket
            )
        if status == 404:
            return NotFound(f"{where} not found ({op})", key=key or "")
        if status == 409:
            return Conflict(f"S3 {op} on {where} conflicted: {code}: {msg}", key=key or "")
        return FailedPrecondition(f"S3 {op} on {where} failed: {code}: {msg}", code=code, status=status)


def _marker(head: Mapping[str, Any]) -> str | None:
    meta = head.get("Metadata") or {}
    value = meta.get(_SHA_META)
    return None if value is None else str(value)


def _info(digest: str, head: Mapping[str, Any]) -> BlobInfo:
    modified = head.get("LastModified")
    return BlobInfo(
        digest,
        int(head["ContentLength"]),
        decode_labels(head.get("Metadata") or {}),
        created=modified.timestamp() if modified is not None else None,
    )


def _copy_part_size(size: int, threshold: int) -> int:
    # No larger than one copy request may be, and few enough for S3's 10 000-part limit.
    return max(min(threshold, _COPY_PART), -(-size // 10_000))


class _BodyReader(io.RawIOBase):
    """The GetObject body as a raw stream, with read errors mapped to Unavailable."""

    def __init__(self, body: Any, store: S3ContentStore, key: str) -> None:
        self._body = body
        self._store = store
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            return int(self._body.readinto(b))
        except bexc.BotoCoreError as e:
            raise self._store._unavailable("read", self._key, e) from e
        except OSError as e:  # urllib3/socket errors that botocore does not wrap
            raise self._store._unavailable("read", self._key, e) from e

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Ingest(IngestBase):
    """One blob being written to S3 (see the module docstring for the protocol)."""

    def __init__(self, store: S3ContentStore, ref: str) -> None:
        super().__init__(ref)
        self._store = store
        self._buf = bytearray()
        self._temp = f"{store.uploads_prefix}{ingest_tag(ref)}-{uuid.uuid4().hex}"
        self._upload_id: str | None = None
        self._pending: deque[Future[dict[str, Any]]] = deque()
        self._parts: list[dict[str, Any]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._temp_written = False

    def __repr__(self) -> str:
        return f"S3Ingest(ref={self.ref!r}, temp={self._temp!r}, offset={self._offset})"

    def _write(self, mv: memoryview) -> None:
        part = self._store.part_size
        pos = 0
        while pos < len(mv):
            # Flush a full buffer only when more bytes arrive: a blob of exactly one part
            # stays on the single-PUT path.
            if len(self._buf) == part:
                self._send_part()
            take = min(part - len(self._buf), len(mv) - pos)
            self._buf += mv[pos : pos + take]
            pos += take

    def _publish(self, digest: str, labels: dict[str, str]) -> BlobInfo:
        store = self._store
        final = store.blob_key(digest)
        meta = {**encode_labels(labels), _SHA_META: digest[7:]}
        if self._upload_id is None:
            body, self._buf = self._buf, bytearray()
            created = store._put_if_absent(final, body, digest, meta)
        else:
            if self._buf:
                self._send_part()
            self._drain(0)
            store._call(
                "complete_multipart_upload",
                Bucket=store.bucket,
                Key=self._temp,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None
            self._temp_written = True
            created = store._copy(self._temp, final, self._offset, meta, if_none_match=True)
            store._delete_quietly(self._temp)
            self._temp_written = False
        self._discard()
        if created:
            return BlobInfo(digest, self._offset, labels, created=datetime.now(UTC).timestamp())
        # Already stored by someone else: same bytes by construction; merge our labels.
        if labels:
            return store.set_labels(digest, labels)
        info = store.info(digest)
        return info if info is not None else BlobInfo(digest, self._offset, {})

    # --- internals ----------------------------------------------------------------------------

    def _send_part(self) -> None:
        store = self._store
        if self._upload_id is None:
            up = store._call(
                "create_multipart_upload",
                Bucket=store.bucket,
                Key=self._temp,
                ContentType="application/octet-stream",
                Metadata={"ingest-ref": quote(self.ref, safe=_VALUE_SAFE)},
            )
            self._upload_id = up["UploadId"]
            self._pool = ThreadPoolExecutor(store.max_in_flight_parts, thread_name_prefix="s3-part")
        # Bounded memory: wait for the oldest upload before starting one more.
        self._drain(store.max_in_flight_parts - 1)
        number = len(self._parts) + len(self._pending) + 1
        data, self._buf = self._buf, bytearray()
        assert self._pool is not None
        self._pending.append(self._pool.submit(self._upload_part, self._upload_id, number, data))

    def _upload_part(self, upload_id: str, number: int, data: bytearray) -> dict[str, Any]:
        store = self._store
        resp = store._call(
            "upload_part",
            Bucket=store.bucket,
            Key=self._temp,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._parts.append(self._pending.popleft().result())

    def _discard(self) -> None:
        self._buf = bytearray()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        store = self._store
        if self._upload_id is not None:
            store._abort_upload(self._temp, self._upload_id)
            self._upload_id = None
        if self._temp_written:
            store._delete_quietly(self._temp)
            self._temp_written = False

"""``s3://bucket/prefix``: any S3-compatible object store, through boto3.

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles), never from the URL. S3 has no per-object TTL: an entry's expiry is
kept in its user metadata and enforced on read; add a bucket lifecycle rule on the
``logits/`` prefix so that expired objects are eventually removed.
"""

from __future__ import annotations

import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from sam2_shared.store.base import BlobStore

# User-metadata key of the expiry (seconds since the epoch). S3 servers differ in the case
# they return user-metadata keys in (rclone capitalises them), so keys are compared lower-case.
EXPIRES_AT_KEY = "sam2-expires-at"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore(BlobStore):
    """One object per key, under ``prefix/`` in ``bucket``.

    Arguments:
        bucket (str): bucket name; it must exist unless ``create_bucket``.
        prefix (str): key prefix inside the bucket ("" for none).
        endpoint_url (str | None): S3-compatible endpoint, e.g. ``http://127.0.0.1:9000``.
        region (str | None): region name for signing.
        create_bucket (bool): create the bucket if missing (tests and development).
        addressing_style (str | None): "path", "virtual" or "auto"; defaults to "path" when
            an endpoint is given (most self-hosted servers need it).
        connect_timeout_s / read_timeout_s (float): socket timeouts.
        max_pool_connections (int): HTTP connection pool size.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        addressing_style: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 30.0,
        max_pool_connections: int = 32,
    ) -> None:
        if not bucket:
            raise ValueError("an s3:// store URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        query = "&".join(
            f"{k}={v}" for k, v in (("endpoint_url", endpoint_url), ("region", region)) if v
        )
        self.url = f"s3://{bucket}/{self.prefix}" + (f"?{query}" if query else "")
        config = Config(
            region_name=region,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=max_pool_connections,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": addressing_style or ("path" if endpoint_url else "auto")},
            # Only checksum where S3 requires it: not every S3-compatible server accepts the
            # newer default CRC headers, and the codec carries its own SHA-256.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        if create_bucket:
            self._create_bucket(region)

    def _create_bucket(self, region: str | None) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND | {"NoSuchBucket"}:
                raise self.unavailable(f"HeadBucket {self.bucket}", exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable(f"HeadBucket {self.bucket}", exc) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self.unavailable(f"CreateBucket {self.bucket}", exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable(f"CreateBucket {self.bucket}", exc) from exc

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            if _expired(response.get("Metadata")):
                response["Body"].close()
                self._delete_quietly(key)
                return None
            return response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise self.unavailable(f"GetObject {key}", exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable(f"GetObject {key}", exc) from exc

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        metadata = {} if ttl_s is None else {EXPIRES_AT_KEY: f"{time.time() + ttl_s:.3f}"}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._object_key(key),
                Body=data,
                Metadata=metadata,
                ContentType="application/octet-stream",
            )
        except (ClientError, BotoCoreError) as exc:
            raise self.unavailable(f"PutObject {key}", exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND:
                raise self.unavailable(f"DeleteObject {key}", exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable(f"DeleteObject {key}", exc) from exc

    def _delete_quietly(self, key: str) -> None:
        try:
            self.delete(key)
        except Exception:  # best effort: an expired object is a miss whether deleted or not
            pass

    def exists(self, key: str) -> bool:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return False
            raise self.unavailable(f"HeadObject {key}", exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable(f"HeadObject {key}", exc) from exc
        return not _expired(response.get("Metadata"))

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self.unavailable(f"HeadBucket {self.bucket}", exc) from exc

    def close(self) -> None:
        self.client.close()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _expired(metadata: dict[str, str] | None) -> bool:
    lowered = {key.lower(): value for key, value in (metadata or {}).items()}
    expires_at = lowered.get(EXPIRES_AT_KEY)
    if expires_at is None:
        return False
    try:
        return time.time() >= float(expires_at)
    except ValueError:
        return True  # unreadable expiry: treat as expired rather than keep forever

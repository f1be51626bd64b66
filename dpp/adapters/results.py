"""Run results in S3: `runs/{tenant}/{run}/pack_envelope.json`.

The object's metadata `actual-cost-usd-micros` is the settlement receipt the
reconciler trusts to roll a half-finalized run forward (SPEC §3).
"""
from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from dpp.adapters.aws import client
from dpp.config import Settings
from dpp.domain.errors import DependencyUnavailable

COST_METADATA = "actual-cost-usd-micros"


def result_key(tenant_id: str, run_id: str) -> str:
    return f"runs/{tenant_id}/{run_id}/pack_envelope.json"


@dataclass(frozen=True)
class StoredResult:
    key: str
    actual_cost_micros: int


class S3Results:
    def __init__(self, settings: Settings):
        self.bucket = settings.s3_result_bucket
        self.s3 = client(settings, "s3", settings.s3_endpoint_url)

    def put(self, key: str, body: bytes, actual_cost_micros: int) -> None:
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                Metadata={COST_METADATA: str(actual_cost_micros)},
            )
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("s3", str(exc)) from exc

    def head(self, key: str) -> StoredResult | None:
        """The stored receipt, or None when no object exists."""
        try:
            meta = self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise DependencyUnavailable("s3", str(exc)) from exc
        except BotoCoreError as exc:
            raise DependencyUnavailable("s3", str(exc)) from exc
        raw = meta.get("Metadata", {}).get(COST_METADATA)
        return StoredResult(key=key, actual_cost_micros=int(raw) if raw is not None else -1)

    def get(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise DependencyUnavailable("s3", str(exc)) from exc
        except BotoCoreError as exc:  # unreachable, or the body's read cut short
            raise DependencyUnavailable("s3", str(exc)) from exc

    def delete(self, key: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("s3", str(exc)) from exc

    def presign(self, key: str, ttl_sec: int) -> str:
        return self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_sec
        )

    def ping(self) -> bool:
        self.s3.head_bucket(Bucket=self.bucket)
        return True

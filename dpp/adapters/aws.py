"""boto3 clients, with static test credentials only for a loopback endpoint."""
from __future__ import annotations

import boto3
from botocore.config import Config

from dpp.config import Settings


# Seconds of silence before a socket wait gives up (botocore's connect and read
# timeouts), and attempts in all per call, for the clients made after `bound_waits`.
_waits = {"connect": 3.0, "read": 10.0, "attempts": 3}


def bound_waits(seconds: float) -> None:
    """Give up on a silent AWS endpoint after `seconds` per wait, for clients made from now on.

    The API sets it (gunicorn.conf.py), as `db.bound_waits`: with the read timeout of
    10 s and three attempts (botocore's `max_attempts` 2 counts the retries), a hung
    S3 kept GET /result 30 s, until gunicorn's worker timeout. Two attempts of
    `seconds` each now. A worker keeps the longer waits (its upload has time, and a
    retry costs a redelivery).
    """
    if seconds <= 0:  # 0: the clients' own waits (as db.bound_waits takes it)
        return
    _waits.update(connect=min(_waits["connect"], seconds), read=seconds, attempts=2)


def client(settings: Settings, service: str, endpoint_url: str | None):
    return boto3.session.Session().client(
        service,
        region_name=settings.aws_region,
        endpoint_url=endpoint_url,
        config=Config(
            connect_timeout=_waits["connect"],
            read_timeout=_waits["read"],
            retries={"total_max_attempts": _waits["attempts"], "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
        **settings.aws_credentials(endpoint_url),
    )

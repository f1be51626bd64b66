"""boto3 clients, with static test credentials only for a loopback endpoint."""
from __future__ import annotations

import boto3
from botocore.config import Config

from dpp.config import Settings


def client(settings: Settings, service: str, endpoint_url: str | None):
    return boto3.session.Session().client(
        service,
        region_name=settings.aws_region,
        endpoint_url=endpoint_url,
        config=Config(
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
        **settings.aws_credentials(endpoint_url),
    )

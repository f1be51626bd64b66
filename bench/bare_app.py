"""A bare WSGI app for the submission baselines that include the queue.

`POST /publish` does the one dependency call a submission cannot avoid, an SQS
SendMessage of about the size of a run's Celery message, with the same botocore
client settings as the API, and answers 201 with a small JSON body. Served by a
second gunicorn with the API's settings (2 sync workers), it tells how much of
POST /v1/runs is moto and how much is ours (bench/run.py, `publish_*` figures).
"""
from __future__ import annotations

from dpp.adapters.aws import client
from dpp.config import get_settings

MESSAGE = "x" * 1500  # a run's message on our transport is 1.2-1.6 KB (base64 Celery envelope)
ANSWER = b'{"status": "QUEUED"}'

_sqs = None  # one client per gunicorn worker, made after the fork


def app(environ, start_response):
    global _sqs
    if _sqs is None:
        _sqs = client(get_settings(), "sqs", get_settings().sqs_endpoint_url)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    environ["wsgi.input"].read(length)
    _sqs.send_message(QueueUrl=get_settings().sqs_queue_url, MessageBody=MESSAGE)
    start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))])
    return [ANSWER]

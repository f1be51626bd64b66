"""Our kombu transport: kombu's SQS transport with the fixes DPP depends on.

Registered as the URL scheme `dppsqs://` (see `register()`), so that every
process that loads the Celery app (worker, beat, Flower, `celery inspect`)
uses it. Each fix names the kombu behaviour it works around.
"""
from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.SQS import Channel as SQSChannel
from kombu.transport.SQS import Transport as SQSTransport

SCHEME = "dppsqs"


class Channel(SQSChannel):
    def _on_messages_ready(self, queue, qname, messages):
        # kombu's asynchronous client turns a ReceiveMessage that timed out,
        # failed with a 5xx or could not reach the endpoint into `[]` ("so the
        # worker does not hang"), but this callback expects the response dict
        # and raises AttributeError on `[].get`. The exception escapes inside
        # the hub's timer, `_loop1` never reschedules the queue, and the worker
        # stops consuming for good while looking healthy (celery/kombu#1127).
        # Found by the chaos runner restarting moto. An empty poll it is.
        if not isinstance(messages, dict):
            return 0
        return super()._on_messages_ready(queue, qname, messages)


class Transport(SQSTransport):
    Channel = Channel


def register() -> None:
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"

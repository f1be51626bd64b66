"""Our kombu transport: kombu's SQS transport with the fixes DPP depends on.

Registered as the URL scheme `dppsqs://` (see `register()`), so that every
process that loads the Celery app (worker, beat, Flower, `celery inspect`)
uses it. Each fix names the kombu or Celery behaviour it works around.

Broadcast over SNS (SPEC §6: Flower, `celery inspect`, `celery control`)
----------------------------------------------------------------------
kombu 5.7 can fan out through SNS (`supports_fanout`): a fanout exchange is an
SNS topic and every queue bound to it is subscribed with raw delivery. Four
things stand between that and a working Flower, each handled here:

1. The SQS transport declares only `direct` exchanges, so Celery turns remote
   control off. `Transport.implements` declares `fanout` too.
2. Celery's event exchange is `topic` (only Redis gets `fanout`), and a topic
   exchange on a virtual transport routes through bindings held in the
   publisher's memory: the worker would deliver its events to nobody.
   Exchanges named in the `broadcast_exchanges` option are declared `fanout`.
3. A remote-control reply is published to the `reply.<ns>.pidbox` exchange
   with the caller's id as routing key; the binding to the caller's reply
   queue lives only in the caller's process. kombu names that queue
   `<id>.reply.<ns>.pidbox`, so `_lookup` routes by that name, and a reply
   whose caller has gone (queue deleted) is dropped instead of re-creating it.
4. Synchronous consumers (`celery inspect`, Flower's event capture) have no
   event-loop hub; see `Channel._delete_message`.

Queues
------
A work queue (the runs queue, option `work_queues`) is never created here:
it is created with its dead-letter queue by `make run`, docker-compose or
infrastructure, and a plain auto-created one would lose the redrive policy. The temporary queues
Celery declares for broadcast (auto-delete or `x-expires`: worker mailboxes,
reply queues, event receivers) are created on demand, tagged, touched while
in use and deleted by `sweep_temporary_queues` once idle, which also removes
SNS subscriptions whose queue is gone. They are never deleted on close: SQS
refuses to re-create a queue of the same name for 60 s, and a restarted
worker or a second `inspect` from the same Flower re-uses the name.
"""
from __future__ import annotations

import logging
import re
import time

from botocore.exceptions import ClientError
from kombu.asynchronous import get_event_loop, set_event_loop
from kombu.asynchronous.http.curl import CurlClient
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.SQS import Channel as SQSChannel
from kombu.transport.SQS import Transport as SQSTransport
from kombu.transport.SQS.exceptions import DoesNotExistQueueException
from kombu.transport.virtual import Transport as VirtualTransport

SCHEME = "dppsqs"
log = logging.getLogger(__name__)

# Tags on the temporary queues we create (SQS has no idle-queue expiry of its own).
TAG_TEMPORARY = "dpp-temporary"
TAG_TOUCHED = "dpp-touched-at"
TAG_IDLE_SEC = "dpp-idle-sec"
# An idle temporary queue lives at least this long (transport option
# `temporary_queue_idle_sec`): long enough that a worker restarting or Flower
# asking again finds it, not so long that a dead Flower's event queue grows for
# hours. Touched every third of it while in use.
MIN_IDLE_SEC = 300
_REPLY_EXCHANGE = re.compile(r"^reply\..+\.pidbox$")
_QUEUE_GONE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}


class WorkQueueMissing(DoesNotExistQueueException):
    """A work queue does not exist: it must be created with its DLQ, not by kombu."""


class Channel(SQSChannel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._work_queues = set()
        for name, url in (self.transport_options.get("work_queues") or {}).items():
            self._work_queues.add(self.canonical_queue_name(name))
            if url:  # a known URL (SQS_QUEUE_URL): no ListQueues or GetQueueUrl for it
                self._queue_cache[self.canonical_queue_name(name)] = url
        # Per connection, not per channel: Flower opens a channel per inspection,
        # and each would otherwise tag its reply queue again.
        self._touched = self.connection._touched  # queue URL -> monotonic time we last tagged it

    # -- broadcast: exchanges ------------------------------------------------------------

    @property
    def fanout(self):
        # kombu caches topic ARNs per channel, so every short-lived channel (each
        # Flower inspection) called CreateTopic again; share them per connection.
        if self._fanout is None:
            fanout = super().fanout
            fanout._topic_arn_cache = self.connection._topic_arns
        return self._fanout

    @property
    def min_idle_sec(self) -> int:
        return int(self.transport_options.get("temporary_queue_idle_sec") or MIN_IDLE_SEC)

    @property
    def broadcast_exchanges(self) -> frozenset:
        return frozenset(self.transport_options.get("broadcast_exchanges") or ())

    def exchange_declare(self, exchange=None, type="direct", *args, **kwargs):
        if exchange in self.broadcast_exchanges:
            type = "fanout"  # Celery's `topic` event exchange: see the module docstring, 2.
        return super().exchange_declare(exchange, type, *args, **kwargs)

    def _lookup(self, exchange, routing_key, default=None):
        queues = super()._lookup(exchange, routing_key, default)
        if not queues and _REPLY_EXCHANGE.match(exchange or ""):
            # A remote-control reply in a process that never saw the caller's
            # binding: kombu's Mailbox names the reply queue `<oid>.<exchange>`.
            return [f"{routing_key}.{exchange}"]
        return queues

    def _put(self, queue, message, **kwargs):
        if _REPLY_EXCHANGE.match(queue.split(".", 1)[-1]):
            try:
                self._resolve_queue_url(queue)
            except DoesNotExistQueueException:
                log.debug("reply to %s dropped: its caller has gone", queue)
                return
        return super()._put(queue, message, **kwargs)

    # -- queues: work queues are never created, temporary ones are tagged ----------------

    def _new_queue(self, queue, **kwargs):
        temporary = bool(kwargs.get("auto_delete")) or "x-expires" in (kwargs.get("arguments") or {})
        try:
            url = self._resolve_queue_url(queue)
        except DoesNotExistQueueException:
            if temporary:
                url = self._create_temporary_queue(queue)
            elif self.canonical_queue_name(queue) in self._work_queues:
                raise WorkQueueMissing(
                    f"SQS queue {self.canonical_queue_name(queue)!r} does not exist; create it with its "
                    "dead-letter queue (make run does, see docs/deploy.md): it is never auto-created"
                ) from None
            else:  # any other queue (`celery control add_consumer`): kombu's own behaviour
                return super()._new_queue(queue, **kwargs)
        if temporary:
            self._touch(queue, url)
        return url

    def _create_temporary_queue(self, queue) -> str:
        name = self.canonical_queue_name(queue)
        # Not Celery's `x-expires` (10 s for a mailbox, 60 s for an event queue):
        # far below SQS's 60 s ban on re-creating a deleted queue's name.
        idle = self.min_idle_sec
        resp = self.sqs().create_queue(
            QueueName=name,
            Attributes={"VisibilityTimeout": str(self.visibility_timeout)},
            tags={TAG_TEMPORARY: "1", TAG_IDLE_SEC: str(idle), TAG_TOUCHED: str(int(time.time()))},
        )
        url = self._queue_cache[name] = resp["QueueUrl"]
        self._touched[url] = time.monotonic()
        # A queue of this name that existed before (swept meanwhile) had its SNS
        # subscription removed with it: forget the cached one, so consuming
        # subscribes the new queue again.
        cached = self.fanout.subscriptions._subscription_arn_cache
        for key in [k for k in cached if k.endswith(f":{queue}")]:
            del cached[key]
        return url

    def _touch(self, queue: str, url: str) -> None:
        """Tell the sweep this temporary queue is in use (every third of its idle time).

        If the sweep removed it anyway (this process could not reach SQS for longer
        than the idle time), put it back and subscribe it again, so a worker that
        lived through an outage answers `inspect` again without a restart.
        """
        now = time.monotonic()
        if now - self._touched.get(url, float("-inf")) < self.min_idle_sec / 3:
            return
        try:
            self.sqs().tag_queue(QueueUrl=url, Tags={TAG_TOUCHED: str(int(time.time()))})
            self._touched[url] = now
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _QUEUE_GONE:
                log.warning("could not touch temporary queue %s: %s", url, exc)
                return
            log.warning("temporary queue %s was swept while in use: re-creating it", url)
            self._queue_cache.pop(self.canonical_queue_name(queue), None)
            self._create_temporary_queue(queue)
            self._subscribe_queue_to_fanout_exchange_if_required(queue)

    def _get_bulk(self, queue, *args, **kwargs):
        self._touch_if_temporary(queue)
        return super()._get_bulk(queue, *args, **kwargs)

    def _get_async(self, queue, *args, **kwargs):
        self._touch_if_temporary(queue)
        return super()._get_async(queue, *args, **kwargs)

    def _touch_if_temporary(self, queue) -> None:
        url = self._queue_cache.get(self.canonical_queue_name(queue))
        if url in self._touched:
            self._touch(queue, url)

    def _receive_message(self, queue, max_number_of_messages=1, wait_time_seconds=None):
        if self.hub is None and queue in self._noack_queues:
            # A synchronous reply collector waits ~1 s per `drain_events`; a long
            # poll of the full wait time would hold `celery inspect` that long
            # after the last reply.
            wait_time_seconds = 1
        return super()._receive_message(queue, max_number_of_messages, wait_time_seconds)

    def _delete(self, queue, exchange=None, *args, **kwargs):
        # kombu deletes auto-delete queues when their consumer goes. Not here: a
        # work queue is never ours to delete, and an idle temporary queue is
        # removed by `sweep_temporary_queues` (module docstring, Queues).
        return None

    def after_reply_message_received(self, queue):
        # kombu deletes the reply queue after every collect; Flower asks again with
        # the same reply queue name within seconds, which SQS would refuse for 60 s.
        self.state.queue_bindings_delete(queue)

    # -- synchronous consumers -----------------------------------------------------------

    def _delete_message(self, queue_name, message):
        # A no-ack queue (every reply queue) deletes each message as it is read,
        # through kombu's asynchronous client, which needs the event-loop hub a
        # worker runs. A synchronous consumer (`celery inspect`, Flower's event
        # capture) has none, and the client's curl multiplexer fails in its
        # constructor: 'NoneType' object has no attribute 'on_close'.
        if self.hub is not None:
            return super()._delete_message(queue_name, message)
        self.sqs().delete_message(QueueUrl=self._new_queue(queue_name), ReceiptHandle=message["ReceiptHandle"])

    # -- kombu#1127 ----------------------------------------------------------------------

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
    # Fanout (SNS) as well as direct: Celery enables remote control only when
    # the transport says it can broadcast (module docstring, 1).
    implements = VirtualTransport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "fanout"]),
    )

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self._topic_arns: dict[str, str] = {}  # exchange -> SNS topic ARN, for all channels
        self._touched: dict[str, float] = {}    # temporary queue URL -> when last tagged (monotonic)

    # -- kombu#2404 with Celery's reconnect: a worker that never polls again --------------

    def register_with_event_loop(self, connection, loop):
        # On a connection error Celery's asynloop calls `hub.reset()` and reconnects
        # with the same hub. Since kombu#2404 `reset()` also does what `close()`
        # does to the global event loop: `set_event_loop(None)`. Every SQS channel
        # takes its hub from `get_event_loop()` when it is created, so the
        # reconnected channels have none: `basic_consume` schedules no poll, and
        # the worker stays up, "Connected", consuming nothing, for good (found by
        # the chaos runner restarting moto; celery#6209, #3877 report the same
        # silence). Celery hands its hub to the transport here, after connecting
        # and before anything consumes: make it the event loop again, for these
        # channels and the ones opened after (pidbox, events).
        if get_event_loop() is None:
            set_event_loop(loop)
        for channel in (*self._avail_channels, *self.channels):
            channel.hub = loop
        _cancel_closed_curl_timers(loop)
        super().register_with_event_loop(connection, loop)


def _cancel_closed_curl_timers(loop) -> None:
    """Cancel the timeout checks a closed curl client left on the hub's timer.

    `CurlClient.close()` cancels its repeating check but not the one-shot ones
    `_set_timeout` scheduled. Each fires after the reset that closed the client
    and calls `info_read` on the closed multi handle ("Error in timer: cannot
    invoke info_read() - no multi handle"); worse, it first removes the closed
    client's file descriptors from the hub and adds them back with its own
    callbacks, and the new client may already be using those numbers.
    """
    for scheduled in loop.timer.queue:
        fun = scheduled.entry.fun
        client = getattr(fun, "__self__", None)
        if (isinstance(client, CurlClient) and client._closed
                and getattr(fun, "__func__", None) is CurlClient._timeout_check):
            loop.timer.cancel(scheduled.entry)


def sweep_temporary_queues(channel: Channel, exchanges, namespace: str, now: float | None = None) -> dict:
    """Delete idle temporary queues, then the SNS subscriptions whose queue is gone.

    A temporary queue is one this transport created and tagged (a worker's
    mailbox, a reply queue, an event receiver's queue); it is idle when it has
    not been touched for its `dpp-idle-sec`. Only queues whose name contains
    `namespace` (the runs queue's name, which every broadcast name carries) are
    looked at, so other applications' queues in the account are never read.
    Safe to run concurrently with itself: a queue deleted twice is gone once.
    """
    now = time.time() if now is None else now
    sqs = channel.sqs()
    deleted, kept = [], 0
    for page in sqs.get_paginator("list_queues").paginate(QueueNamePrefix=""):
        for url in page.get("QueueUrls", []):
            name = url.rsplit("/", 1)[-1]
            if namespace not in name:
                continue
            try:
                tags = sqs.list_queue_tags(QueueUrl=url).get("Tags") or {}
            except ClientError:
                continue  # deleted meanwhile
            if tags.get(TAG_TEMPORARY) != "1":
                continue
            idle = int(tags.get(TAG_IDLE_SEC) or MIN_IDLE_SEC)
            if now - int(tags.get(TAG_TOUCHED) or 0) <= idle:
                kept += 1
                continue
            try:
                sqs.delete_queue(QueueUrl=url)
            except ClientError as exc:
                log.warning("could not delete idle temporary queue %s: %s", name, exc)
                continue
            channel._queue_cache.pop(name, None)
            deleted.append(name)
    removed = 0
    for exchange in exchanges:
        # kombu's own clean-up unsubscribes every SQS subscription whose queue is gone.
        before = _subscription_count(channel, exchange)
        channel.fanout.subscriptions.cleanup(exchange)
        removed += before - _subscription_count(channel, exchange)
    return {"deleted_queues": sorted(deleted), "temporary_queues_kept": kept,
            "stale_subscriptions_removed": removed}


def _subscription_count(channel: Channel, exchange: str) -> int:
    sns = channel.fanout.get_client()
    topic = channel.fanout._get_or_create_topic(exchange)
    return sum(len(page.get("Subscriptions", []))
               for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic))


def sweep_broker(app) -> dict:
    """`sweep_temporary_queues` for a Celery app configured like celeryconfig.py."""
    conf = app.conf
    exchanges = [conf.event_exchange, f"{conf.control_exchange}.pidbox"]
    with app.connection_for_write() as conn:
        return sweep_temporary_queues(conn.default_channel, exchanges, namespace=conf.task_default_queue)


def register() -> None:
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"

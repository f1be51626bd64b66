"""Our SQS transport's broadcast over SNS (dpp/adapters/kombu_sqs.py), against moto.

Each test uses its own namespace (exchange and queue names), so it never sees
the queues of another test, of the e2e worker, or of a `make run` on the same moto.
"""
from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.pidbox import Mailbox

from dpp.adapters import kombu_sqs
from dpp.adapters.aws import client


@pytest.fixture
def ns():
    return f"bc-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def connect(settings, ns):
    """Connections through `dppsqs://` to the test moto, configured like celeryconfig."""
    from urllib.parse import urlsplit

    kombu_sqs.register()
    parts = urlsplit(settings.sqs_endpoint_url)
    opened = []

    def connect(idle_sec: int = 300, work_queues: dict | None = None) -> Connection:
        conn = Connection(f"dppsqs://testing:testing@{parts.hostname}:{parts.port}", transport_options={
            "region": settings.aws_region, "is_secure": False, "supports_fanout": True,
            "broadcast_exchanges": [f"{ns}-events"], "temporary_queue_idle_sec": idle_sec,
            "work_queues": work_queues or {}, "wait_time_seconds": 1, "polling_interval": 0.1,
        })
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.release()


@pytest.fixture
def aws(settings):
    return client(settings, "sqs", settings.sqs_endpoint_url), client(settings, "sns", settings.sqs_endpoint_url)


def drain(conn: Connection, queue: Queue, want: int, timeout: float = 20.0) -> list:
    got = []
    with Consumer(conn.default_channel, [queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
    return got


def test_the_transport_says_it_can_broadcast(connect):
    # Celery switches remote control off unless the transport declares fanout.
    assert connect().supports_exchange_type("fanout")


def test_the_topic_event_exchange_fans_out_to_every_receiver(connect, ns):
    """Celery declares its event exchange `topic`; published in one process, every
    receiver's queue (declared in others) gets the event through SNS."""
    events = Exchange(f"{ns}-events", type="topic")
    receivers = [Queue(f"{ns}-ev.{i}", events, routing_key="#", auto_delete=True) for i in range(2)]
    listeners = [connect(), connect()]
    for conn, queue in zip(listeners, receivers):
        queue(conn.default_channel).declare()
        # Subscribed when it starts consuming; drain once so the subscription exists.
        drain(conn, queue, want=1, timeout=1)

    with connect() as publisher:
        Producer(publisher.default_channel).publish({"type": "worker-heartbeat"}, exchange=events,
                                                   routing_key="worker.heartbeat", declare=[events])
    for conn, queue in zip(listeners, receivers):
        assert drain(conn, queue, want=1) == [{"type": "worker-heartbeat"}]


def test_a_reply_finds_the_callers_queue_without_its_binding(connect, ns):
    """A worker replies to `reply.<ns>.pidbox` with the caller's id; only the caller's
    process holds the binding. The reply still reaches the caller's queue."""
    caller = Mailbox(ns, type="fanout")(connect())
    reply_queue = caller.reply_queue(caller.connection.default_channel)
    reply_queue.declare()

    worker = Mailbox(ns, type="fanout")(connect())
    worker._publish_reply({"w1": "pong"}, caller.reply_exchange.name, caller.oid, ticket="t1")

    assert drain(caller.connection, caller.reply_queue, want=1) == [{"w1": "pong"}]


def test_a_reply_to_a_caller_that_has_gone_creates_no_queue(connect, ns, aws):
    sqs, _ = aws
    worker = Mailbox(ns, type="fanout")(connect())
    worker._publish_reply({"w1": "pong"}, f"reply.{ns}.pidbox", "gone-caller", ticket="t1")
    assert not sqs.list_queues(QueueNamePrefix="gone-caller").get("QueueUrls")


def test_the_runs_queue_is_never_auto_created(connect, ns, aws):
    sqs, _ = aws
    name = f"{ns}-runs"
    with pytest.raises(kombu_sqs.WorkQueueMissing, match="dead-letter"):
        Queue(name, Exchange(name), name)(connect(work_queues={name: None}).default_channel).declare()
    assert not sqs.list_queues(QueueNamePrefix=name).get("QueueUrls")


def test_idle_temporary_queues_and_their_subscriptions_are_swept(connect, ns, aws):
    sqs, sns = aws
    events = Exchange(f"{ns}-events", type="topic")
    queue = Queue(f"{ns}-ev.dead-flower", events, routing_key="#", auto_delete=True)
    conn = connect()
    queue(conn.default_channel).declare()
    drain(conn, queue, want=1, timeout=1)  # subscribes it
    channel = conn.default_channel
    topic = channel.fanout._get_or_create_topic(events.name)
    assert len(sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]) == 1

    # In use: kept. Idle for longer than its idle time: deleted, and kombu's clean-up
    # then removes the SNS subscription that pointed at it.
    report = kombu_sqs.sweep_temporary_queues(channel, [events.name], namespace=ns)
    assert report == {"deleted_queues": [], "temporary_queues_kept": 1, "stale_subscriptions_removed": 0}
    report = kombu_sqs.sweep_temporary_queues(channel, [events.name], namespace=ns, now=time.time() + 301)
    assert report == {"deleted_queues": [f"{ns}-ev-dead-flower"], "temporary_queues_kept": 0,
                      "stale_subscriptions_removed": 1}
    assert not sqs.list_queues(QueueNamePrefix=f"{ns}-ev").get("QueueUrls")
    assert sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"] == []


def test_a_queue_swept_while_in_use_comes_back_subscribed(connect, ns, aws):
    """A consumer that could not reach SQS for longer than the idle time finds its
    queue swept; at its next touch it re-creates it and subscribes it again."""
    sqs, sns = aws
    events = Exchange(f"{ns}-events", type="topic")
    queue = Queue(f"{ns}-ev.sleeper", events, routing_key="#", auto_delete=True)
    conn = connect(idle_sec=3)  # touched every second while consuming
    queue(conn.default_channel).declare()
    drain(conn, queue, want=1, timeout=1)
    sweeper = connect().default_channel  # another process: the consumer's caches still hold the queue
    kombu_sqs.sweep_temporary_queues(sweeper, [events.name], namespace=ns, now=time.time() + 10)
    assert not sqs.list_queues(QueueNamePrefix=f"{ns}-ev").get("QueueUrls")

    time.sleep(1.5)
    drain(conn, queue, want=1, timeout=2)  # polls, so touches: finds it gone, puts it back
    assert sqs.list_queues(QueueNamePrefix=f"{ns}-ev").get("QueueUrls")
    with connect() as publisher:
        Producer(publisher.default_channel).publish({"type": "task-succeeded"}, exchange=events,
                                                   routing_key="task.succeeded", declare=[events])
    assert drain(conn, queue, want=1) == [{"type": "task-succeeded"}]

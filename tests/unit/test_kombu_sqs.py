"""Our SQS transport's fix, without a broker: the callback kombu's client feeds."""
from kombu.transport import resolve_transport

from dpp.adapters import kombu_sqs


class Bare(kombu_sqs.Channel):
    def __init__(self):  # no connection: only the callback is under test
        pass


def test_a_failed_poll_is_an_empty_poll_not_a_dead_consumer():
    # kombu's async client hands `[]` to this callback after a timeout, a 5xx
    # or an unreachable endpoint; upstream raises AttributeError there.
    assert Bare()._on_messages_ready(object(), "q", []) == 0


def test_an_empty_receive_is_still_an_empty_poll():
    assert Bare()._on_messages_ready(object(), "q", {}) == 0


def test_the_scheme_resolves_to_our_transport():
    kombu_sqs.register()
    assert resolve_transport("dppsqs") is kombu_sqs.Transport


def test_channels_of_a_reconnect_poll_with_the_worker_hub_that_celery_reset(caplog):
    # Celery's asynloop resets its hub on a connection error and reconnects with
    # it; the reset closes the curl client and, since kombu#2404, unsets the
    # global event loop every new SQS channel takes its hub from.
    from kombu import Connection
    from kombu.asynchronous import Hub, get_event_loop, set_event_loop
    from kombu.asynchronous.http import get_client

    hub = set_event_loop(Hub())
    try:
        get_client(hub)._set_timeout(0)  # a one-shot timeout check, as a request in flight leaves
        hub.reset()
        assert get_event_loop() is None

        transport = Connection(transport=kombu_sqs.Transport).transport
        channel = Bare()
        channel.hub = None  # what kombu's Channel.__init__ took from get_event_loop()
        transport.channels.append(channel)
        transport.register_with_event_loop(None, hub)  # Consumer.connect, after connecting

        assert channel.hub is hub and get_event_loop() is hub
        hub.fire_timers()  # the closed client's check would call info_read on no multi handle
        assert "no multi handle" not in caplog.text
        assert get_client(hub)._multi is not None  # a new client for the new channels
    finally:
        hub.close()
        set_event_loop(None)

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

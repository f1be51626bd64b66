"""The Celery application (`celery -A dpp …` finds `dpp.celery.app`).

Tasks live in the top-level `tasks/` package as thin wrappers over services.
"""
from celery import Celery
from celery.signals import setup_logging

from dpp.adapters import kombu_sqs

kombu_sqs.register()  # before any connection: the broker URL's scheme is ours
app = Celery("dpp", include=["tasks.runs", "tasks.sweeps"])
app.config_from_object("celeryconfig")


@setup_logging.connect
def _logging(**_):
    # Our JSON logs in workers and beat too, instead of Celery's own format.
    from dpp.config import get_settings
    from dpp.logs import configure_logging

    configure_logging(get_settings())

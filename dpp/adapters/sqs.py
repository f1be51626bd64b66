"""Direct SQS calls the Celery transport does not make for us."""
from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from dpp.adapters.aws import client
from dpp.config import Settings
from dpp.domain.errors import DependencyUnavailable


class SqsAdmin:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.sqs = client(settings, "sqs", settings.sqs_endpoint_url)
        self._url = settings.sqs_queue_url

    @property
    def queue_url(self) -> str:
        if self._url is None:
            self._url = self.sqs.get_queue_url(QueueName=self.settings.sqs_queue_name)["QueueUrl"]
        return self._url

    def extend_visibility(self, queue_url: str, receipt_handle: str, seconds: int) -> None:
        try:
            self.sqs.change_message_visibility(
                QueueUrl=queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=min(seconds, 43_200)
            )
        except (BotoCoreError, ClientError) as exc:
            raise DependencyUnavailable("sqs", str(exc)) from exc

    def depth(self) -> dict[str, int]:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return {
            "visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        }

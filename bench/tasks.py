"""The bare baseline task the benchmarks compare `dpp.execute_run` with.

Loaded only by the benchmark's worker (`celery -A dpp worker -I bench.tasks`): a
Celery task over the same SQS broker that does the one thing every run must do
besides its pack and its money, an S3 put, and nothing else.
"""
from dpp.bootstrap import deps
from dpp.celery import app


@app.task(name="bench.noop_put", ignore_result=False)
def noop_put(key: str) -> str:
    d = deps()
    d.results.s3.put_object(Bucket=d.results.bucket, Key=f"bench/{key}", Body=b"{}")
    return key

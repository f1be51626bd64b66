"""Real processes: gunicorn serving the API and a `celery worker` on the SQS broker."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import devstack  # noqa: E402  (scripts/devstack.py: process helpers shared with `make run`)

BIN = Path(sys.executable).parent


# The test packs the e2e API runs: its /openapi.json lists them as pack_type values.
E2E_PACKS = "tests.support.packs:BoomPack,tests.support.packs:SlowPack,tests.support.packs:HangPack"

@pytest.fixture(scope="package")
def platform(settings, tmp_path_factory):
    """API base URL, with one worker consuming the test queue; stopped by PID after the e2e tests.

    Package scope: once the e2e tests are done no worker may consume the queue,
    or it would race the integration tests that drive the worker in-process.
    """
    logs = tmp_path_factory.mktemp("e2e-logs")
    port = devstack.free_port()
    env = {
        **os.environ,
        "DPP_EXTRA_PACKS": E2E_PACKS,
        # The url pack may fetch from the tests' page server on 127.0.0.2, and nothing
        # else local: 127.0.0.1 and `localhost` stay refused, as in production.
        "DPP_URL_ALLOWLIST": "127.0.0.2/32",
        "PYTHONPATH": str(ROOT),
        "CORS_ALLOWED_ORIGINS": "https://agent.example",
        # Two gunicorn workers: /metrics must aggregate both (multiprocess mode).
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus")),
    }
    metrics_port = devstack.free_port()  # the API's only: the worker would serve on it too
    api = devstack.start_process(
        [str(BIN / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", "2", "dpp.api:create_app()"],
        env={**env, "DPP_METRICS_PORT": str(metrics_port)}, log_path=logs / "api.log",
    )
    worker = devstack.start_process(
        [str(BIN / "celery"), "-A", "dpp", "worker", "-l", "INFO", "-c", "1", "-n", f"e2e-{port}@%h",
         "--without-gossip", "--without-mingle"],
        env=env, log_path=logs / "worker.log",
    )
    try:
        devstack.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield {"url": f"http://127.0.0.1:{port}", "logs": logs, "env": env,
               "metrics_url": f"http://127.0.0.1:{metrics_port}"}
    finally:
        devstack.stop_process(worker)
        devstack.stop_process(api)

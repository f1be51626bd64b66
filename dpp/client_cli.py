"""`dpp submit` and `dpp wait`: the agent's side of the API from a shell, over `dpp.client`.

Unlike the admin commands these talk HTTP to a running API with a tenant's key
(`DPP_API_URL`, `DPP_API_KEY`) and need none of the services' environment.

Exit codes: 0 the run COMPLETED (or, without --wait, was accepted), 1 it FAILED,
2 anything else — refused, unreachable, timed out — with the reason on stderr.
"""
from __future__ import annotations

import json
import sys

import click

from dpp.client import DppApiError, DppClient, DppClientError, Run, RunTimeout, new_idempotency_key

DEFAULT_API_URL = "http://127.0.0.1:8000"


def _print_run(run: Run) -> None:
    click.echo(json.dumps(run.raw, indent=2, sort_keys=True))


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _describe(exc: DppClientError) -> str:
    if isinstance(exc, DppApiError):
        fields = exc.problem.get("errors")
        if fields:
            return f"{exc}\n" + "\n".join(f"  {name}: {msgs}" for name, msgs in fields.items())
    return str(exc)


def _finish(client: DppClient, run: Run, wait: bool, timeout: float) -> None:
    if wait and not run.done:
        try:
            run = client.wait(run.run_id, timeout=timeout)
        except RunTimeout as exc:
            if exc.run is not None:
                _print_run(exc.run)
            _fail(f"{exc}; continue with `dpp wait {run.run_id}`")
        except DppClientError as exc:
            _fail(f"{_describe(exc)} (run {run.run_id}; continue with `dpp wait {run.run_id}`)")
    _print_run(run)
    sys.exit(1 if run.status == "FAILED" else 0)


_api_options = [
    click.option("--api-url", envvar="DPP_API_URL", default=DEFAULT_API_URL, show_default=True,
                 show_envvar=True, help="Base URL of the DPP API."),
    click.option("--api-key", envvar="DPP_API_KEY", show_envvar=True, help="The tenant's API key."),
]


def _with_api_options(fn):
    for option in reversed(_api_options):
        fn = option(fn)
    return fn


def _client(api_url: str, api_key: str | None) -> DppClient:
    if not api_key:
        _fail("an API key is required: --api-key or DPP_API_KEY")
    return DppClient(api_url, api_key)


@click.command("submit")
@click.option("--pack", "pack_type", required=True, help="Pack type, e.g. decision.")
@click.option("--inputs", "inputs_json", help="The pack's inputs as a JSON object.")
@click.option("--inputs-file", type=click.File("r"), help="A file holding the inputs JSON ('-' for stdin).")
@click.option("--max-cost", required=True, help='Price cap in USD as a decimal string, e.g. 0.50.')
@click.option("--idempotency-key", help="Reuse to retry a submission safely; a fresh one by default.")
@click.option("--wait", "wait", is_flag=True, help="Wait for COMPLETED or FAILED and print the final run.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds --wait waits.")
@_with_api_options
def submit(pack_type, inputs_json, inputs_file, max_cost, idempotency_key, wait, timeout, api_url, api_key):
    """Submit a paid run and print it as JSON."""
    if (inputs_json is None) == (inputs_file is None):
        _fail("give exactly one of --inputs and --inputs-file")
    try:
        inputs = json.loads(inputs_json if inputs_json is not None else inputs_file.read())
    except json.JSONDecodeError as exc:
        _fail(f"inputs are not valid JSON: {exc}")
    if not isinstance(inputs, dict):
        _fail("inputs must be a JSON object")
    client = _client(api_url, api_key)
    # Chosen here rather than inside the client so that, if every attempt fails, the
    # user can be told which key to retry with: the same key can never reserve twice.
    key = idempotency_key or new_idempotency_key()
    try:
        run = client.submit(pack_type, inputs, max_cost, idempotency_key=key)
    except DppClientError as exc:
        hint = "" if isinstance(exc, DppApiError) and exc.status < 500 else (
            f"\nto retry without paying twice: --idempotency-key {key}"
        )
        _fail(_describe(exc) + hint)
    _finish(client, run, wait, timeout)


@click.command("wait")
@click.argument("run_id")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@_with_api_options
def wait(run_id, timeout, api_url, api_key):
    """Wait for a run to finish; print it as JSON. Exit 0 COMPLETED, 1 FAILED, 2 error."""
    client = _client(api_url, api_key)
    try:
        run = client.get(run_id)
    except DppClientError as exc:
        _fail(_describe(exc))
    _finish(client, run, True, timeout)


def register(main_group: click.Group) -> None:
    """Attach `submit` and `wait` to the `dpp` group; calling it again changes nothing."""
    for command in (submit, wait):
        if main_group.commands.get(command.name) is not command:
            main_group.add_command(command)

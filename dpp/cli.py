"""The admin CLI, `dpp` (SPEC §6): thin over the same services as the API."""
from __future__ import annotations

import sys

import click

from dpp import client_cli
from dpp.bootstrap import deps
from dpp.domain.errors import DppError, InvalidMoney
from dpp.domain.money import format_usd, parse_usd


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group()
def main() -> None:
    """Decisionproof administration."""


@main.group()
def plans() -> None:
    """Plans: limits and fees per tenant."""


@plans.command("seed")
def plans_seed() -> None:
    """Create or update the plans free, basic and pro."""
    from dpp.services.tenants import seed_plans

    d = deps()
    seed_plans(d, extra_pack_types=tuple(t for t in d.packs.types() if t not in ("decision", "url")))
    click.echo("plans seeded: free, basic, pro")


@main.group()
def tenant() -> None:
    """Tenants."""


@tenant.command("create")
@click.option("--id", "tenant_id", required=True, help="Tenant id, e.g. acme")
@click.option("--plan", "plan_id", default="free", show_default=True)
def tenant_create(tenant_id: str, plan_id: str) -> None:
    from dpp.services import tenants

    try:
        tenants.create_tenant(deps(), tenant_id, plan_id)
    except tenants.TenantExists:
        _fail(f"tenant {tenant_id!r} already exists")
    except tenants.UnknownPlan:
        _fail(f"unknown plan {plan_id!r} (run `dpp plans seed`)")
    click.echo(f"tenant {tenant_id} created on plan {plan_id}")


@main.group()
def key() -> None:
    """API keys."""


@key.command("issue")
@click.option("--tenant", "tenant_id", required=True)
def key_issue(tenant_id: str) -> None:
    """Print a new key once; only its hash is stored."""
    from dpp.services import tenants

    try:
        new_key = tenants.issue_key(deps(), tenant_id)
    except tenants.UnknownTenant:
        _fail(f"unknown tenant {tenant_id!r}")
    click.echo("API key (shown once, store it now):", err=True)
    click.echo(new_key)


@key.command("revoke")
@click.argument("api_key")
def key_revoke(api_key: str) -> None:
    from dpp.services import tenants

    if not tenants.revoke_key(deps(), api_key):
        _fail("no such active key")
    click.echo("key revoked")


@main.group()
def budget() -> None:
    """Prepaid budget."""


@budget.command("topup")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--amount", required=True, help='USD as a decimal string, e.g. 10.00')
def budget_topup(tenant_id: str, amount: str) -> None:
    from dpp.services import ledger, tenants

    try:
        micros = parse_usd(amount)
    except InvalidMoney as exc:
        _fail(f"--amount {exc}")
    if micros <= 0:
        _fail("--amount must be positive")
    d = deps()
    if not tenants.tenant_exists(d, tenant_id):
        _fail(f"unknown tenant {tenant_id!r}")
    after = ledger.topup(d, tenant_id, micros, memo="dpp budget topup")
    click.echo(f"topped up {format_usd(micros)}; available {format_usd(after.available)}")


@budget.command("show")
@click.option("--tenant", "tenant_id", required=True)
def budget_show(tenant_id: str) -> None:
    """Ledger balances and the Redis mirror of available."""
    from dpp.services import ledger, tenants

    d = deps()
    if not tenants.tenant_exists(d, tenant_id):
        _fail(f"unknown tenant {tenant_id!r}")
    with d.db.transaction() as session:
        books = ledger.balances(session, tenant_id)
    mirror = d.budget.available(tenant_id)
    click.echo(f"tenant     {tenant_id}")
    click.echo(f"funded     {format_usd(books.funded)}")
    click.echo(f"available  {format_usd(books.available)}")
    click.echo(f"held       {format_usd(books.held)}")
    click.echo(f"spent      {format_usd(books.spent)}")
    click.echo(f"redis      {format_usd(mirror) if mirror is not None else '(missing: dpp budget rebuild)'}")


@budget.command("rebuild")
@click.option("--tenant", "tenant_id", required=True)
def budget_rebuild(tenant_id: str) -> None:
    """Restore the tenant's Redis mirror from the ledger."""
    from dpp.services import ledger

    books = ledger.rebuild(deps(), tenant_id)
    click.echo(f"redis available set to {format_usd(books.available)}")


@main.command("audit")
@click.option("--tenant", "tenant_ids", multiple=True, help="Only these tenants (default: all).")
def audit_cmd(tenant_ids: tuple[str, ...]) -> None:
    """Prove SPEC §2 invariants 1-3 for every tenant; exit 1 with a report on any violation."""
    from dpp.services.audit import audit

    report = audit(deps(), list(tenant_ids) or None)
    click.echo(f"tenants checked  {report.tenants_checked}")
    click.echo(f"runs checked     {report.runs_checked}")
    if report.ok:
        click.echo("invariants 1-3   hold")
        return
    click.echo(f"violations       {len(report.violations)}")
    for violation in report.violations:
        click.echo(f"  - {violation}")
    sys.exit(1)


@main.command("verify")
@click.argument("envelope_file", type=click.Path(dir_okay=False, allow_dash=True))
def verify_cmd(envelope_file: str) -> None:
    """Check a pack_envelope.json's signature; exit 0 if intact, 1 saying why if not.

    The key comes from DPP_SIGNING_KEY / DPP_SIGNING_KEY_ID (the development key
    when unset, so a proof from `make run` verifies out of the box).
    """
    import json

    from dpp.config import get_settings
    from dpp.domain import proof

    try:
        with click.open_file(envelope_file, "rb") as handle:
            document = json.loads(handle.read())
    except (OSError, ValueError) as exc:
        click.echo(f"INVALID: cannot read {envelope_file}: {exc}", err=True)
        sys.exit(1)
    key, key_id = get_settings().signing
    verdict = proof.verify(document, {key_id: key})
    if not verdict.ok:
        click.echo(f"INVALID: {verdict.reason}", err=True)
        sys.exit(1)
    click.echo(f"OK: {verdict.reason}; run {document.get('run_id')}, input_hash {document.get('input_hash')}")


client_cli.register(main)  # `dpp submit` / `dpp wait`: the agent client, for humans


def run() -> None:  # pragma: no cover - console entry
    try:
        main()
    except DppError as exc:
        _fail(str(exc))

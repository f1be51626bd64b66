"""The admin CLI, `dpp` (SPEC §6): thin over the same services as the API."""
from __future__ import annotations

import os
import sys

import click

from dpp import client_cli
from dpp.bootstrap import deps
from dpp.domain.keys import PREFIX as KEY_PREFIX
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


@tenant.command("suspend")
@click.argument("tenant_id")
@click.option("--reason", required=True, help="Why, for the log (the audit trail).")
def tenant_suspend(tenant_id: str, reason: str) -> None:
    """Refuse the tenant's requests (403) from its next one; runs in flight finish and settle."""
    _set_tenant_status(tenant_id, "suspended", reason)


@tenant.command("resume")
@click.argument("tenant_id")
@click.option("--reason", required=True, help="Why, for the log (the audit trail).")
def tenant_resume(tenant_id: str, reason: str) -> None:
    """Serve the tenant again from its next request."""
    _set_tenant_status(tenant_id, "active", reason)


@tenant.command("unfreeze")
@click.argument("tenant_id")
@click.option("--reason", required=True, help="What was found and fixed (the audit trail).")
def tenant_unfreeze(tenant_id: str, reason: str) -> None:
    """Take the tenant's submissions again after an automatic freeze (AUDIT_REQUIRED or drift)."""
    import getpass

    from dpp.services import admissions

    if not admissions.unfreeze_tenant(deps(), tenant_id, reason=reason, operator=getpass.getuser()):
        _fail(f"tenant {tenant_id!r} is not frozen")
    click.echo(f"tenant {tenant_id}: admissions open again")


def _set_tenant_status(tenant_id: str, status: str, reason: str) -> None:
    import getpass
    import logging

    from dpp.services import tenants

    try:
        previous = tenants.set_status(deps(), tenant_id, status)
    except tenants.UnknownTenant:
        _fail(f"unknown tenant {tenant_id!r}")
    logging.getLogger("dpp.cli").warning("tenant status changed", extra={
        "tenant_id": tenant_id, "from": previous, "to": status, "reason": reason, "operator": getpass.getuser()})
    click.echo(f"tenant {tenant_id}: {previous} -> {status}")


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
@click.argument("api_key", required=False)
@click.option("--id", "key_id", type=int, help="The key's id, from `dpp key list`.")
@click.option("--prefix", help="The key's shown prefix (e.g. dpp_live_ab12cd), from `dpp key list`.")
def key_revoke(api_key: str | None, key_id: int | None, prefix: str | None) -> None:
    """Revoke a key, named by the key itself, its id or its shown prefix (one of them)."""
    from dpp.services import tenants

    if sum(x is not None for x in (api_key, key_id, prefix)) != 1:
        _fail("name the key one way: the key, --id or --prefix")
    if api_key is not None:
        if not tenants.revoke_key(deps(), api_key):
            _fail("no such active key")
        click.echo("key revoked")
        return
    if prefix is not None and len(prefix) < len(KEY_PREFIX) + 4:
        # Every key starts with the same "dpp_live_": fewer characters past it match
        # too many keys to name one.
        _fail(f"--prefix needs at least {len(KEY_PREFIX) + 4} characters (as `dpp key list` shows them)")
    try:
        info = tenants.revoke_key_by(deps(), key_id=key_id, prefix=prefix)
    except tenants.AmbiguousKey as exc:
        _fail("several active keys match; use --id: "
              + ", ".join(f"{k.id} ({k.tenant_id}, {k.prefix}…)" for k in exc.matches))
    if info is None:
        _fail("no such active key")
    click.echo(f"key {info.id} ({info.prefix}…) of tenant {info.tenant_id} revoked")


@key.command("list")
@click.option("--tenant", "tenant_id", required=True)
def key_list(tenant_id: str) -> None:
    """The tenant's keys: id, shown prefix, created, revoked (never the key)."""
    from dpp.services import tenants

    try:
        found = tenants.list_keys(deps(), tenant_id)
    except tenants.UnknownTenant:
        _fail(f"unknown tenant {tenant_id!r}")
    click.echo(f"{'id':>6}  {'prefix':<18} {'created':<20} revoked")
    for k in found:
        revoked = k.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if k.revoked_at else "-"
        click.echo(f"{k.id:>6}  {k.prefix + '…':<18} {k.created_at:%Y-%m-%d %H:%M:%S}  {revoked}")


@main.group()
def budget() -> None:
    """Prepaid budget."""


_REFERENCE_HELP = (
    "Required: your unique id for this money (a payment, invoice or ticket id). A retry with the "
    "same reference and amount moves nothing, so no money is ever moved twice."
)


def _money_arg(option: str, text: str, *, signed: bool = False) -> int:
    sign = -1 if signed and text.startswith("-") else 1
    try:
        micros = parse_usd(text[1:] if signed and text[:1] in "+-" else text)
    except InvalidMoney as exc:
        _fail(f"{option} {exc}")
    if micros == 0 or (not signed and micros < 0):
        _fail(f"{option} must be {'non-zero' if signed else 'positive'}")
    return sign * micros


def _reference_arg(reference: str | None) -> str:
    if reference is None or not reference.strip():
        _fail("--reference is required: a unique id for this money (a payment, invoice or ticket id), "
              "so that a retry with it never moves the money twice")
    reference = reference.strip()
    if len(reference) > 255 or not reference.isprintable():
        _fail("--reference must be at most 255 printable characters")
    return reference


def _known_tenant(d, tenant_id: str) -> None:
    from dpp.services import tenants

    if not tenants.tenant_exists(d, tenant_id):
        _fail(f"unknown tenant {tenant_id!r}")


def _report_posting(posted, tenant_id: str, what: str, verb: str, done: str) -> None:
    """One line for an operator's posting (or its replay), then what became of Redis."""
    available = format_usd(posted.books.available)
    if posted.replayed:
        click.echo(f"already {what}: reference {posted.reference} {verb} {format_usd(posted.amount_micros)} at "
                   f"{posted.posted_at:%Y-%m-%d %H:%M:%S %Z}; nothing moved; available {available}")
        return
    click.echo(f"{done}; available {available}")
    _report_mirror(posted, tenant_id, what)


def _report_mirror(posted, tenant_id: str, what: str) -> None:
    if posted.mirror == "unavailable":
        click.echo(
            f"warning: the ledger is {what}, but Redis could not be updated, so new runs see the old "
            f"balance. Do not repeat this with a new reference. Run `dpp budget rebuild --tenant {tenant_id}` "
            "once Redis answers (a retry with the same reference is safe: it moves nothing).",
            err=True,
        )
    elif posted.mirror == "rebuilt":
        click.echo("redis had no balance for the tenant: set from the ledger", err=True)


@budget.command("topup")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--amount", required=True, help='USD as a decimal string, e.g. 10.00')
@click.option("--reference", help=_REFERENCE_HELP)
def budget_topup(tenant_id: str, amount: str, reference: str | None) -> None:
    """Credit prepaid budget: the ledger first, then the Redis mirror.

    Exits 0 once the ledger is credited, even if Redis then fails (with a
    warning: the mirror lags until `dpp budget rebuild`).
    """
    from dpp.domain.errors import ReferenceConflict
    from dpp.services import ledger

    micros = _money_arg("--amount", amount)
    reference = _reference_arg(reference)
    d = deps()
    _known_tenant(d, tenant_id)
    try:
        posted = ledger.topup(d, tenant_id, micros, memo="dpp budget topup", reference=reference)
    except ReferenceConflict as exc:
        _fail(f"reference {reference!r} already credited {format_usd(exc.posted_micros)} to {tenant_id}, "
              f"not {format_usd(micros)}; nothing moved (a new payment needs a new reference)")
    _report_posting(posted, tenant_id, "credited", "topped up",
                    f"topped up {format_usd(micros)} (reference {reference})")


@budget.command("adjust")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--amount", required=True, help="Signed USD, e.g. 2.50 or -2.50 (taken from available).")
@click.option("--reason", required=True, help="Why, for the audit trail (stored in the ledger memo).")
@click.option("--reference", help=_REFERENCE_HELP)
@click.option("--operator", default=lambda: os.environ.get("USER", ""), show_default="$USER",
              help="Who is adjusting (logged and stored with the reason).")
def budget_adjust(tenant_id: str, amount: str, reason: str, reference: str | None, operator: str) -> None:
    """An audited correction of available (an ADJUST transfer), idempotent by reference."""
    from dpp.domain.errors import InsufficientBudget, ReferenceConflict
    from dpp.services import ledger

    micros = _money_arg("--amount", amount, signed=True)
    reference = _reference_arg(reference)
    if not reason.strip():
        _fail("--reason must say why")
    if not operator.strip():
        _fail("--operator is required when $USER is not set")
    d = deps()
    _known_tenant(d, tenant_id)
    try:
        posted = ledger.adjust(d, tenant_id, micros, reason=reason, reference=reference, operator=operator.strip())
    except ReferenceConflict as exc:
        _fail(f"reference {reference!r} already adjusted {tenant_id} by {format_usd(exc.posted_micros)}, "
              f"not {format_usd(micros)}; nothing moved (a new correction needs a new reference)")
    except InsufficientBudget as exc:
        _fail(f"adjusting by {format_usd(micros)} would make available negative "
              f"(available {format_usd(exc.available_micros)}); nothing moved")
    _report_posting(posted, tenant_id, "adjusted", "moved",
                    f"adjusted {format_usd(micros)} (reference {reference}, by {operator.strip()})")


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


@main.group()
def admissions() -> None:
    """The platform's admissions: pause new runs for an incident or maintenance."""


@admissions.command("pause")
@click.option("--reason", required=True, help="Why, for the log and /readyz.")
def admissions_pause(reason: str) -> None:
    """POST /v1/runs answers 503 everywhere; runs in flight, reads and sweeps go on."""
    import getpass

    from dpp.services import admissions as service

    made = service.pause(deps(), reason=reason, operator=getpass.getuser())
    click.echo("admissions paused" if made else "admissions were already paused (the first reason stays)")


@admissions.command("resume")
@click.option("--reason", required=True, help="Why, for the log.")
def admissions_resume(reason: str) -> None:
    import getpass

    from dpp.services import admissions as service

    if not service.resume(deps(), reason=reason, operator=getpass.getuser()):
        _fail("admissions were not paused")
    click.echo("admissions resumed")


@admissions.command("status")
def admissions_status() -> None:
    """The holds in force: the platform's pause and each frozen tenant."""
    from dpp.services import admissions as service

    held = service.closed(deps())
    if not held:
        click.echo("admissions open; no tenant frozen")
    for h in held:
        click.echo(f"{h['scope']:<24} {h['kind']:<7} since {h['since']} by {h['operator']}: {h['reason']}")


@main.command("audit")
@click.option("--tenant", "tenant_ids", multiple=True, help="Only these tenants (default: all).")
@click.option("--full", is_flag=True,
              help="Sum every transfer and check every run again, ignoring the last checkpoint.")
def audit_cmd(tenant_ids: tuple[str, ...], full: bool) -> None:
    """Prove SPEC §2 invariants 1-3 for every tenant; exit 1 with a report on any violation.

    By default it starts from each tenant's last checkpoint (what the previous
    sound audit summed) and checks the runs moved since plus those not settled."""
    from dpp.services.audit import audit

    report = audit(deps(), list(tenant_ids) or None, full=full)
    click.echo(f"tenants checked  {report.tenants_checked}")
    click.echo(f"runs checked     {report.runs_checked}{' (all)' if full else ' (moved since the last checkpoint, or not settled)'}")
    if report.pending:
        # Known repairs on their way (a mirror Redis lost, a young orphan hold): not drift.
        click.echo(f"pending          {len(report.pending)} (repairs on their way, not drift)")
        for item in report.pending:
            click.echo(f"  ~ {item}")
    if report.ok:
        click.echo("invariants 1-3   hold")
        return
    click.echo(f"violations       {len(report.violations)}")
    for violation in report.violations:
        click.echo(f"  - {violation}")
    sys.exit(1)


@main.command("reconcile")
@click.argument("run_id")
@click.option("--force", is_flag=True, help="Act even on a run a worker may still be finishing (a young "
              "finalize claim or a live lease): only once you know that worker is gone.")
def reconcile_cmd(run_id: str, force: bool) -> None:
    """Resolve one run now, as `celery -A dpp call dpp.reconcile_run` does; print its report.

    Exits 1 when the run is unknown or the reconcile was refused.
    """
    import json
    import uuid

    from dpp.services.sweeps import reconcile_run

    try:
        uuid.UUID(run_id)
    except ValueError:
        _fail(f"{run_id!r} is not a run id")
    report = reconcile_run(deps(), run_id, force=force)
    click.echo(json.dumps(report, indent=2, default=str))
    if not report["found"] or str(report["action"]).startswith("refused"):
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

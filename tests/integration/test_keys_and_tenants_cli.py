"""`dpp key list|revoke` and `dpp tenant suspend|resume` on real PostgreSQL (issue 14).

Before: a key could be revoked only with its plaintext, which is shown once and
rarely kept, and a tenant could not be suspended at all without SQL.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from dpp import cli
from dpp.domain.errors import Forbidden
from dpp.domain.keys import display_prefix
from dpp.services import tenants
from tests.conftest import assert_invariants, make_tenant


@pytest.fixture
def dpp_cli(clean, monkeypatch):
    monkeypatch.setattr(cli, "deps", lambda: clean)

    def invoke(*args: str):
        return CliRunner().invoke(cli.main, list(args), env={"USER": "alice"})

    return invoke


def test_keys_are_listed_and_revoked_by_id_or_prefix_never_shown(clean, dpp_cli):
    tenant_id, first = make_tenant(clean)
    second = tenants.issue_key(clean, tenant_id)
    listed = dpp_cli("key", "list", "--tenant", tenant_id)
    assert listed.exit_code == 0, listed.output
    assert display_prefix(first) in listed.output and display_prefix(second) in listed.output
    assert first not in listed.output and second not in listed.output  # only prefixes
    ids = [k.id for k in tenants.list_keys(clean, tenant_id)]

    by_prefix = dpp_cli("key", "revoke", "--prefix", display_prefix(first))
    assert by_prefix.exit_code == 0, by_prefix.output
    with pytest.raises(Forbidden):
        tenants.authenticate(clean, first)
    tenants.authenticate(clean, second)  # the other key still works

    by_id = dpp_cli("key", "revoke", "--id", str(ids[1]))
    assert by_id.exit_code == 0 and f"key {ids[1]}" in by_id.output, by_id.output
    with pytest.raises(Forbidden):
        tenants.authenticate(clean, second)
    again = dpp_cli("key", "revoke", "--id", str(ids[1]))
    assert again.exit_code == 2 and "no such active key" in again.stderr
    assert [k.revoked_at is not None for k in tenants.list_keys(clean, tenant_id)] == [True, True]


def test_a_prefix_matching_several_keys_revokes_none(clean, dpp_cli):
    from dpp.adapters import orm

    tenant_id, first = make_tenant(clean)
    with clean.db.transaction() as session:  # a second key whose shown prefix is the same (rare, possible)
        session.add(orm.ApiKey(tenant_id=tenant_id, key_hash="0" * 64, display_prefix=display_prefix(first)))
    too_short = dpp_cli("key", "revoke", "--prefix", first[:10])  # "dpp_live_" + 1: names no key
    assert too_short.exit_code == 2 and "at least" in too_short.stderr
    result = dpp_cli("key", "revoke", "--prefix", display_prefix(first))
    assert result.exit_code == 2 and "several active keys match" in result.stderr, result.output
    assert all(k.revoked_at is None for k in tenants.list_keys(clean, tenant_id))


def test_naming_a_key_two_ways_or_none_is_refused(clean, dpp_cli):
    _, key = make_tenant(clean)
    assert dpp_cli("key", "revoke").exit_code == 2
    assert dpp_cli("key", "revoke", key, "--id", "1").exit_code == 2
    tenants.authenticate(clean, key)


def test_suspend_and_resume_take_effect_on_the_next_request(clean, dpp_cli):
    tenant_id, key = make_tenant(clean)
    assert tenants.authenticate(clean, key).tenant_id == tenant_id
    result = dpp_cli("tenant", "suspend", tenant_id, "--reason", "chargeback under review")
    assert result.exit_code == 0 and "active -> suspended" in result.output, result.output
    with pytest.raises(Forbidden, match="suspended"):
        tenants.authenticate(clean, key)
    assert dpp_cli("tenant", "suspend", tenant_id).exit_code == 2  # --reason is required
    result = dpp_cli("tenant", "resume", tenant_id, "--reason", "cleared")
    assert result.exit_code == 0 and "suspended -> active" in result.output
    assert tenants.authenticate(clean, key).tenant_id == tenant_id
    assert dpp_cli("tenant", "suspend", "nobody", "--reason", "x").exit_code == 2
    assert_invariants(clean, [tenant_id])

"""The Redis budget gate: the Lua scripts of `lua/`, loaded once, called by SHA.

Key names are SPEC §2's. Every key a script touches carries the `{tenant_id}`
hash tag, so the scripts run unchanged on Redis Cluster / Valkey Serverless.
This adapter knows nothing about the ledger; `dpp.services.ledger` drives it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

import redis

from dpp.adapters.outages import raise_if_outage

RECEIPT_TTL_SEC = 30 * 24 * 3600
# Absent after any loss of Redis's data; see RedisBudget.mark_mirror. No hash tag:
# it is only ever read or set alone.
MIRROR_SENTINEL_KEY = "budget:mirror_generation"


def balance_key(tenant_id: str) -> str:
    return f"budget:{{{tenant_id}}}:balance_usd_micros"


def reserve_key(tenant_id: str, run_id: str) -> str:
    return f"reserve:{{{tenant_id}}}:{run_id}"


def receipt_key(tenant_id: str, run_id: str) -> str:
    return f"settle_receipt:{{{tenant_id}}}:{run_id}"


def holds_key(tenant_id: str) -> str:
    return f"holds:{{{tenant_id}}}"


def _load(name: str) -> str:
    return resources.files("dpp.adapters").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class ReserveOutcome:
    ok: bool
    balance_micros: int
    amount_micros: int
    code: int


@dataclass(frozen=True)
class Receipt:
    """What Redis recorded for a settlement; `replayed` when it was already settled."""

    charge_micros: int
    release_micros: int
    settled_at_ms: int
    replayed: bool
    reservation_missing: bool = False


@dataclass(frozen=True)
class MirrorView:
    """One tenant's mirror at one instant (RedisBudget.audit_read).

    detail: run_id -> (hold amount, hold reserved_at ms, receipt release); None where absent.
    """

    balance_micros: int | None
    members: "list[str]"
    detail: "dict[str, tuple[int | None, int | None, int | None]]"


class BudgetMissing(Exception):
    """Redis has no balance for the tenant (new, or wiped): rebuild from the ledger."""


class AlreadySettled(Exception):
    """A reservation was asked for a run whose reservation was already settled."""


class RedisBudget:
    def __init__(self, client: redis.Redis):
        self.client = client
        # register_script sends EVALSHA and falls back to EVAL on NOSCRIPT, so a
        # restarted or failed-over Redis reloads the scripts by itself.
        self._reserve = client.register_script(_load("reserve"))
        self._settle = client.register_script(_load("settle"))
        self._release = client.register_script(_load("release"))
        self._credit = client.register_script(_load("credit"))
        self._debit = client.register_script(_load("debit"))
        self._restore = client.register_script(_load("restore"))
        self._audit_read = client.register_script(_load("audit_read"))

    @classmethod
    def from_url(cls, url: str, cluster: bool = False) -> "RedisBudget":
        if cluster:
            # Redis Cluster / Valkey Serverless: every script's keys share one
            # {tenant} slot, so redis-py routes each call to a single node.
            from redis.cluster import RedisCluster

            return cls(RedisCluster.from_url(url, socket_connect_timeout=2, socket_timeout=2))
        return cls(
            redis.Redis.from_url(
                url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=30
            )
        )

    def _call(self, script, keys, args):
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise

    def reserve(self, tenant_id: str, run_id: str, amount_micros: int) -> ReserveOutcome:
        code, balance, amount = self._call(
            self._reserve,
            [balance_key(tenant_id), reserve_key(tenant_id, run_id), receipt_key(tenant_id, run_id),
             holds_key(tenant_id)],
            [amount_micros, _now_ms(), run_id],
        )
        if code == -3:
            raise BudgetMissing(tenant_id)
        if code == -2:
            raise AlreadySettled(run_id)
        return ReserveOutcome(ok=code == 1, balance_micros=int(balance), amount_micros=int(amount), code=code)

    def settle(self, tenant_id: str, run_id: str, charge_micros: int, reserved_micros: int = 0) -> Receipt:
        """`reserved_micros`: the ledger's reservation, what the receipt records when
        Redis lost the hold (0: the receipt moves nothing)."""
        code, charge, release, settled_at = self._call(
            self._settle,
            [balance_key(tenant_id), reserve_key(tenant_id, run_id), receipt_key(tenant_id, run_id),
             holds_key(tenant_id)],
            [charge_micros, _now_ms(), RECEIPT_TTL_SEC, run_id, reserved_micros],
        )
        return Receipt(
            charge_micros=int(charge),
            release_micros=int(release),
            settled_at_ms=int(settled_at),
            replayed=code == 2,
            reservation_missing=code == -1,
        )

    def release(self, tenant_id: str, run_id: str) -> int:
        return int(self._call(
            self._release, [balance_key(tenant_id), reserve_key(tenant_id, run_id), holds_key(tenant_id)], [run_id]
        ))

    def credit(self, tenant_id: str, amount_micros: int) -> int | None:
        """Add a committed top-up; None when Redis has no balance for the tenant."""
        balance = int(self._call(self._credit, [balance_key(tenant_id)], [amount_micros]))
        return None if balance < 0 else balance

    def debit(self, tenant_id: str, amount_micros: int) -> int | None:
        """Take a committed negative adjustment out; None when Redis has no balance for the tenant."""
        found, balance = self._call(self._debit, [balance_key(tenant_id)], [amount_micros])
        return int(balance) if found == 1 else None

    def available(self, tenant_id: str) -> int | None:
        try:
            raw = self.client.get(balance_key(tenant_id))
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise
        return None if raw is None else int(raw)

    def reservation(self, tenant_id: str, run_id: str) -> int | None:
        raw = self.client.hget(reserve_key(tenant_id, run_id), "amount")
        return None if raw is None else int(raw)

    def holds(self, tenant_id: str) -> "list[tuple[str, int, int]]":
        """The tenant's live holds: (run_id, amount, reserved_at_ms).

        Read from the tenant's `holds:{tenant}` set (kept by the scripts), so no
        keyspace scan is needed, on one node or a cluster.
        """
        try:
            members = sorted(m.decode() for m in self.client.smembers(holds_key(tenant_id)))
            pipe = self.client.pipeline(transaction=False)
            for run_id in members:
                pipe.hmget(reserve_key(tenant_id, run_id), "amount", "reserved_at")
            rows = pipe.execute() if members else []
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise
        return [(run_id, int(amount), int(at or 0)) for run_id, (amount, at) in zip(members, rows) if amount is not None]

    def receipt(self, tenant_id: str, run_id: str) -> dict | None:
        raw = self.client.hgetall(receipt_key(tenant_id, run_id))
        return {k.decode(): int(v) for k, v in raw.items()} or None

    def restore(self, tenant_id: str, available_micros: int, reservations: dict[str, int]) -> int:
        """Set the tenant's Redis state to what the ledger says (`dpp budget rebuild`).

        One script on keys of one hash tag (a cluster accepts it). Reservations the
        ledger holds are put back so that their later settle finds them, unless
        Redis already settled them; holds the ledger does not know are dropped
        (restore.lua: the caller holds the tenant's fence, so they are orphans).
        Returns the balance set.
        """
        orphans = sorted(set(self.hold_ids(tenant_id)) - set(reservations))
        keys = [balance_key(tenant_id), holds_key(tenant_id)]
        args = [available_micros, _now_ms(), len(reservations)]
        for run_id, amount in sorted(reservations.items()):
            keys += [reserve_key(tenant_id, run_id), receipt_key(tenant_id, run_id)]
            args += [run_id, amount]
        keys += [reserve_key(tenant_id, run_id) for run_id in orphans]
        args += orphans
        return int(self._call(self._restore, keys, args))

    def mark_mirror(self, generation: str) -> bool:
        """Set the mirror sentinel if it is absent; True when it was absent (Redis lost data).

        A wipe (FLUSHALL, a restart without data, a failover to an empty replica)
        takes the sentinel with it, so one GET tells the watcher whether every
        tenant's mirror must be checked. Set *before* the restores it triggers: a
        wipe during them removes it again and the next watch starts over.
        """
        try:
            return bool(self.client.set(MIRROR_SENTINEL_KEY, generation, nx=True))
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise

    def missing_mirrors(self, tenant_ids: "list[str]") -> "list[str]":
        """The tenants whose balance key is absent (pipelined EXISTS, routed per key on a cluster)."""
        if not tenant_ids:
            return []
        try:
            pipe = self.client.pipeline(transaction=False)
            for tenant_id in tenant_ids:
                pipe.exists(balance_key(tenant_id))
            found = pipe.execute()
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise
        return [t for t, present in zip(tenant_ids, found) if not present]

    def mirror_summaries(self, tenant_ids: "list[str]") -> "dict[str, tuple[int | None, int]]":
        """Each tenant's (available or None, number of holds): pipelined by 1,000 tenants,
        routed per key on a cluster."""
        summaries = {}
        for start in range(0, len(tenant_ids), 1000):
            batch = tenant_ids[start:start + 1000]
            try:
                pipe = self.client.pipeline(transaction=False)
                for tenant_id in batch:
                    pipe.get(balance_key(tenant_id))
                    pipe.scard(holds_key(tenant_id))
                found = pipe.execute()
            except redis.RedisError as exc:
                raise_if_outage(exc)
                raise
            summaries.update({t: (None if raw is None else int(raw), int(holds))
                              for t, raw, holds in zip(batch, found[0::2], found[1::2])})
        return summaries

    def hold_ids(self, tenant_id: str) -> "list[str]":
        """The run ids in the tenant's holds set (no amounts: see `holds`)."""
        try:
            return sorted(m.decode() for m in self.client.smembers(holds_key(tenant_id)))
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise

    def audit_read(self, tenant_id: str, candidates: "list[str]") -> "MirrorView":
        """The balance, the holds and each candidate run's hold and receipt, at one instant.

        One script over keys of one hash tag. A member of the holds set that is
        not among `candidates` shows in `members` without detail: read again.
        """
        keys = [balance_key(tenant_id), holds_key(tenant_id)]
        for run_id in candidates:
            keys += [reserve_key(tenant_id, run_id), receipt_key(tenant_id, run_id)]
        raw = self._call(self._audit_read, keys, [])
        count = int(raw[1])
        members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw[2:2 + count])
        detail, rest = {}, raw[2 + count:]
        for i, run_id in enumerate(candidates):
            amount, at, release = (int(v) for v in rest[3 * i:3 * i + 3])
            detail[run_id] = (None if amount < 0 else amount, None if at < 0 else at, None if release < 0 else release)
        balance = int(raw[0])
        return MirrorView(None if balance < 0 else balance, members, detail)

    def ping(self) -> bool:
        return bool(self.client.ping())


def _now_ms() -> int:
    return int(time.time() * 1000)

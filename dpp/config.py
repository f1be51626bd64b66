"""Settings, read only from the environment (SPEC §6).

Every process (API, worker, beat, CLI, tests) builds one `Settings` from
`os.environ`; nothing reads a config file. Defaults are the local development
stack that `make run` starts, so a bare checkout talks to loopback services.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# moto accepts any credentials; these are used only when the endpoint is loopback.
STATIC_TEST_ACCESS_KEY = "testing"
STATIC_TEST_SECRET_KEY = "testing"
# Public on purpose: proofs signed with it prove nothing outside development.
DEVELOPMENT_SIGNING_KEY = b"dpp-development-signing-key-not-secret"


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    return default if raw in (None, "") else int(raw)


def _float(env: dict, name: str, default: float) -> float:
    raw = env.get(name)
    return default if raw in (None, "") else float(raw)


def _bool(env: dict, name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def is_local_host(host: str | None) -> bool:
    """True for a host that names this machine: loopback or unspecified, however spelled.

    Parsed, never substring-matched: `127.0.0.1.evil.com` is not local, while
    `127.1`, `0x7f.1`, `2130706433` (the forms inet_aton and so every HTTP
    client accept), `0.0.0.0`, `::`, `::1`, `::ffff:127.0.0.1`, `localhost.` and
    `*.localhost` (RFC 6761) all are.
    """
    if not host:
        return False
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return False
    mapped = getattr(address, "ipv4_mapped", None)
    return any(a is not None and (a.is_loopback or a.is_unspecified) for a in (address, mapped))


def is_loopback_url(url: str | None) -> bool:
    """True when the URL's host is this machine (`is_local_host`)."""
    if not url:
        return False
    try:
        return is_local_host(urlsplit(url).hostname)
    except ValueError:  # an unparsable URL names no host we could trust
        return False


# DPP_ENV values; any other is refused at start (a typo must not mean "not production").
ENVIRONMENTS = ("development", "test", "production")
# Production refuses to guess these: a default would point it at a loopback service.
REQUIRED_IN_PRODUCTION = ("DATABASE_URL", "REDIS_URL")
# Fault injection (dpp/faults.py) exists for the tests and the chaos runner only.
FAULT_SETTINGS = ("DPP_FAULTS", "DPP_FAULT_TOKENS")
MIN_SIGNING_KEY_BYTES = 32


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/dpp"
    database_url_migrations: str | None = None
    db_pool: str = "queuepool"
    # The API gives up on a PostgreSQL, SQS or S3 that stays silent this long (0: never
    # for PostgreSQL), and answers 503: below gunicorn's 30 s worker timeout, with a
    # reconnect's or a retry's wait too.
    io_timeout_sec: float = 5.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    aws_region: str = "us-east-1"
    sqs_endpoint_url: str | None = None
    sqs_queue_name: str = "dpp-runs"
    # Sweeps and the engineers' tasks travel on a queue of their own, so that they
    # never wait behind a backlog of runs, nor runs behind a backlog of sweeps.
    # Default: "<sqs_queue_name>-sweeps", created on first use.
    sqs_sweeps_queue_name: str | None = None
    sqs_queue_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_result_bucket: str = "dpp-results"
    cors_allowed_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    json_logs: bool = True
    worker_lease_ttl_sec: int = 60
    worker_heartbeat_interval_sec: int = 15
    # SQS visibility timeout; the heartbeat extends it while a run is worked.
    worker_visibility_timeout_sec: int | None = None
    reaper_interval_sec: int = 30
    reaper_scan_limit: int = 100
    queued_timeout_sec: int = 1800
    # A QUEUED run's message is published again every queued_timeout_sec / attempts
    # (it may be lost); after the last attempt's share it ends FAILED QUEUE_TIMEOUT at 0.
    redrive_attempts: int = 3
    orphan_hold_grace_sec: int = 120
    audit_interval_sec: int = 300
    # The audit from the first transfer, past the checkpoints (dpp/services/audit.py).
    audit_full_interval_sec: int = 86400
    # How often the scheduling beat checks that Redis still has its data (one GET),
    # and restores every tenant's mirror when it does not (docs/CHAOS.md bounds).
    mirror_watch_interval_sec: float = 1.0
    reconcile_interval_sec: int = 60
    reconcile_threshold_min: float = 5  # fractions allowed (tests use seconds)
    reconcile_scan_limit: int = 100
    billing_preflight_required: bool = False
    presign_ttl_sec: int = 900
    extra_packs: tuple[str, ...] = field(default_factory=tuple)
    # CIDRs the url pack may fetch from although private/loopback (tests' local servers).
    url_allowlist: tuple[str, ...] = field(default_factory=tuple)
    # Signs decision proofs. Development falls back to a published key so that
    # `make run` works; production refuses to start without a real one.
    signing_key: str | None = None
    signing_key_id: str = "dev"
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    # Which of the variables production must see were set (non-empty) in the environment.
    explicit: frozenset = frozenset()

    @property
    def sweeps_queue(self) -> str:
        return self.sqs_sweeps_queue_name or f"{self.sqs_queue_name}-sweeps"

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        origins = tuple(o.strip() for o in env.get("CORS_ALLOWED_ORIGINS", "").split(",") if o.strip())
        packs = tuple(p.strip() for p in env.get("DPP_EXTRA_PACKS", "").split(",") if p.strip())
        url_allowlist = tuple(c.strip() for c in env.get("DPP_URL_ALLOWLIST", "").split(",") if c.strip())
        return cls(
            env=env.get("DPP_ENV", cls.env),
            database_url=env.get("DATABASE_URL", cls.database_url),
            database_url_migrations=env.get("DATABASE_URL_MIGRATIONS") or None,
            db_pool=env.get("DPP_DB_POOL", cls.db_pool),
            io_timeout_sec=_float(env, "DPP_IO_TIMEOUT_SEC",  # its former name still read
                                  _float(env, "DPP_DB_IO_TIMEOUT_SEC", cls.io_timeout_sec)),
            redis_url=env.get("REDIS_URL", cls.redis_url),
            redis_cluster=_bool(env, "DPP_REDIS_CLUSTER", False),
            aws_region=env.get("AWS_REGION", cls.aws_region),
            sqs_endpoint_url=env.get("SQS_ENDPOINT_URL") or None,
            sqs_queue_name=env.get("SQS_QUEUE_NAME", cls.sqs_queue_name),
            sqs_sweeps_queue_name=env.get("SQS_SWEEPS_QUEUE_NAME") or None,
            sqs_queue_url=env.get("SQS_QUEUE_URL") or None,
            s3_endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            s3_result_bucket=env.get("S3_RESULT_BUCKET", cls.s3_result_bucket),
            cors_allowed_origins=origins,
            log_level=env.get("LOG_LEVEL", cls.log_level),
            json_logs=_bool(env, "DPP_JSON_LOGS", cls.json_logs),
            worker_lease_ttl_sec=_int(env, "WORKER_LEASE_TTL_SEC", cls.worker_lease_ttl_sec),
            worker_heartbeat_interval_sec=_int(
                env, "WORKER_HEARTBEAT_INTERVAL_SEC", cls.worker_heartbeat_interval_sec
            ),
            worker_visibility_timeout_sec=_int(env, "WORKER_VISIBILITY_TIMEOUT_SEC", 0) or None,
            reaper_interval_sec=_int(env, "REAPER_INTERVAL_SEC", cls.reaper_interval_sec),
            reaper_scan_limit=_int(env, "REAPER_SCAN_LIMIT", cls.reaper_scan_limit),
            queued_timeout_sec=_int(env, "REAPER_QUEUED_TIMEOUT_SEC", cls.queued_timeout_sec),
            redrive_attempts=max(1, _int(env, "REAPER_REDRIVE_ATTEMPTS", cls.redrive_attempts)),
            orphan_hold_grace_sec=_int(env, "REAPER_ORPHAN_HOLD_GRACE_SEC", cls.orphan_hold_grace_sec),
            audit_interval_sec=_int(env, "AUDIT_INTERVAL_SEC", cls.audit_interval_sec),
            audit_full_interval_sec=_int(env, "AUDIT_FULL_INTERVAL_SEC", cls.audit_full_interval_sec),
            mirror_watch_interval_sec=float(env.get("MIRROR_WATCH_INTERVAL_SEC") or cls.mirror_watch_interval_sec),
            reconcile_interval_sec=_int(env, "RECONCILE_INTERVAL_SEC", cls.reconcile_interval_sec),
            reconcile_threshold_min=_float(env, "RECONCILE_THRESHOLD_MIN", cls.reconcile_threshold_min),
            reconcile_scan_limit=_int(env, "RECONCILE_SCAN_LIMIT", cls.reconcile_scan_limit),
            billing_preflight_required=_bool(env, "DPP_BILLING_PREFLIGHT_REQUIRED", False),
            presign_ttl_sec=_int(env, "DPP_PRESIGN_TTL_SEC", cls.presign_ttl_sec),
            extra_packs=packs,
            url_allowlist=url_allowlist,
            signing_key=env.get("DPP_SIGNING_KEY") or None,
            signing_key_id=env.get("DPP_SIGNING_KEY_ID") or "dev",
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            explicit=frozenset(n for n in (*REQUIRED_IN_PRODUCTION, *FAULT_SETTINGS) if env.get(n)),
        )

    @property
    def signing(self) -> tuple[bytes, str]:
        """(key, key id) for decision proofs."""
        if self.signing_key:
            return self.signing_key.encode(), self.signing_key_id
        return DEVELOPMENT_SIGNING_KEY, "dev"

    @property
    def migrations_url(self) -> str:
        return self.database_url_migrations or self.database_url

    def aws_credentials(self, endpoint_url: str | None) -> dict:
        """boto3 credential kwargs for one endpoint.

        Static test keys are handed out only to a loopback endpoint (moto); any
        other endpoint gets the standard AWS credential chain (IAM role, env).
        """
        if is_loopback_url(endpoint_url) and not self.aws_access_key_id:
            return {
                "aws_access_key_id": STATIC_TEST_ACCESS_KEY,
                "aws_secret_access_key": STATIC_TEST_SECRET_KEY,
            }
        return {}

    def check_production(self) -> None:
        """Refuse to start production on anything a development default could slip in.

        Every refusal names the setting; each has a test (tests/unit/test_config.py).
        """
        if self.env not in ENVIRONMENTS:
            raise RuntimeError(f"DPP_ENV={self.env!r} is not one of {', '.join(ENVIRONMENTS)}")
        if self.env != "production":
            return
        for name in REQUIRED_IN_PRODUCTION:
            if name not in self.explicit:
                raise RuntimeError(f"DPP_ENV=production needs {name} set explicitly (the default is loopback)")
        faults = [name for name in FAULT_SETTINGS if name in self.explicit]
        if faults:
            raise RuntimeError(f"DPP_ENV=production refuses fault injection: {', '.join(faults)} is set")
        for name, url in (("SQS_ENDPOINT_URL", self.sqs_endpoint_url), ("S3_ENDPOINT_URL", self.s3_endpoint_url)):
            if is_loopback_url(url):
                raise RuntimeError(f"DPP_ENV=production refuses loopback endpoint {name}={url}")
        if self.aws_access_key_id and not self.aws_session_token:
            # Long-lived keys in the environment leak with it (crash dumps, `env` in a
            # shell); production takes a role (IRSA / instance profile), whose keys
            # are temporary and come with a session token.
            raise RuntimeError("DPP_ENV=production refuses static AWS keys (AWS_ACCESS_KEY_ID without "
                               "AWS_SESSION_TOKEN): give the pod an IAM role instead")
        if not self.signing_key or self.signing_key_id == "dev":
            raise RuntimeError("DPP_ENV=production needs DPP_SIGNING_KEY and DPP_SIGNING_KEY_ID (not 'dev')")
        if len(self.signing_key.encode()) < MIN_SIGNING_KEY_BYTES:
            raise RuntimeError(f"DPP_ENV=production needs a DPP_SIGNING_KEY of at least {MIN_SIGNING_KEY_BYTES} "
                               f"bytes (HMAC-SHA256), not {len(self.signing_key.encode())}")
        never = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fd00:ec2::254/128")]
        for cidr in self.url_allowlist:
            if any(ipaddress.ip_network(cidr, strict=False).overlaps(n) for n in never):
                raise RuntimeError(f"DPP_ENV=production refuses DPP_URL_ALLOWLIST entry {cidr} (loopback or metadata)")
        test_packs = [p for p in self.extra_packs if p.startswith("tests.")]
        if test_packs:
            raise RuntimeError(f"DPP_ENV=production refuses test-only packs: {test_packs}")


def check_flower(settings: Settings, argv: list[str], environ: dict) -> None:
    """Flower shows every task's arguments and can revoke tasks and restart pools:
    in production it must not start without authentication (basic auth, or
    Flower's OAuth), whatever the chart or the command line forgot."""
    if settings.env != "production":
        return
    flags = ("--basic-auth", "--basic_auth", "--auth")
    if environ.get("FLOWER_BASIC_AUTH") or environ.get("FLOWER_AUTH") or any(
            a.split("=", 1)[0] in flags for a in argv):
        return
    raise RuntimeError("DPP_ENV=production refuses to start Flower without FLOWER_BASIC_AUTH (or --basic-auth / "
                       "FLOWER_AUTH): it can see task arguments and control workers")


_settings: Settings | None = None


def get_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def reset_settings() -> None:
    """Forget the cached settings (tests that change the environment)."""
    global _settings
    _settings = None

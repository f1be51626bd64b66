"""`make deploy-check` inside `make test`: the chart rendered by a real Helm engine,
validated against Kubernetes' schemas, and what the chart promises (issue #8).

No services: the chart is rendered offline (helm-python-sdk) and nothing is applied.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import deploy_check as dc  # noqa: E402


@pytest.fixture(scope="module", params=dc.VALUES_FILES)
def release(request):
    return request.param, dc.render(request.param)


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env(deployment) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment).get("env", [])}


def test_every_manifest_is_valid_for_kubernetes_and_its_crds(release):
    values_file, docs = release
    errors = [e for doc in docs for e in dc.validate_manifest(doc)]
    assert not errors, "\n".join(errors)


def test_the_validation_can_fail(release):
    """An unknown field, a wrong type and a bad CRD value are each reported."""
    _, docs = release
    deployment = copy.deepcopy(next(iter(by_kind(docs, "Deployment").values())))
    container(deployment)["bogus"] = 1
    assert any("'bogus' was unexpected" in e for e in dc.validate_manifest(deployment))
    deployment = copy.deepcopy(next(iter(by_kind(docs, "Deployment").values())))
    deployment["spec"]["revisionHistoryLimit"] = "five"
    assert any("is not of type 'integer'" in e for e in dc.validate_manifest(deployment))
    crd = copy.deepcopy(next(d for d in docs if (d["apiVersion"], d["kind"]) in dc.CRDS or d["kind"] == "Job"))
    if (crd["apiVersion"], crd["kind"]) in dc.CRDS:
        crd["spec"]["unheardOf"] = True
        assert any("unheardOf" in e for e in dc.validate_manifest(crd))


@pytest.mark.parametrize("what,values_file,overrides,reason", dc.GUARD_RAILS, ids=[g[0] for g in dc.GUARD_RAILS])
def test_the_chart_refuses(what, values_file, overrides, reason):
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        dc.render(values_file, overrides)


def test_every_role_runs_non_root_read_only_with_probes(release):
    _, docs = release
    for name, deployment in by_kind(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        c = container(deployment)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(c), name
        # A slow starter gets its startup probe's whole budget before liveness counts.
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, name


def test_workers_and_beat_probe_their_health_endpoint_and_serve_metrics(release):
    _, docs = release
    deployments = by_kind(docs, "Deployment")
    for role in ("dpp-worker", "dpp-beat"):
        c = container(deployments[role])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert env(deployments[role])["DPP_METRICS_PORT"] == "9100"
        assert env(deployments[role])["PROMETHEUS_MULTIPROC_DIR"] == "/run/prometheus"
    assert "--without-gossip" in container(deployments["dpp-worker"])["command"]


def test_the_api_is_scraped_on_its_metrics_port_not_the_public_one(release):
    """Issue 14: in production the public port answers /metrics 404 (dpp/api/health.py)."""
    _, docs = release
    api = by_kind(docs, "Deployment")["dpp-api"]
    assert env(api)["DPP_METRICS_PORT"] == "9100"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container(api)["ports"]
    for monitor in by_kind(docs, "ServiceMonitor").values():
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_worker_grace_outlives_the_lease_and_beat_has_a_standby(release):
    values_file, docs = release
    config = by_kind(docs, "ConfigMap")["dpp"]["data"]
    worker = by_kind(docs, "Deployment")["dpp-worker"]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > int(config.get("WORKER_LEASE_TTL_SEC", "60"))
    if values_file != "values-dev.yaml":
        assert by_kind(docs, "Deployment")["dpp-beat"]["spec"]["replicas"] == 2
        assert "dpp-worker" in by_kind(docs, "ScaledObject")
        assert set(by_kind(docs, "PodDisruptionBudget")) == {"dpp-api", "dpp-worker", "dpp-beat"}
        assert "dpp-api" in by_kind(docs, "HorizontalPodAutoscaler")


def test_migrations_run_as_a_hook_before_install_and_upgrade(release):
    _, docs = release
    job = by_kind(docs, "Job")["dpp-migrate"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "alembic upgrade head" in " ".join(container({"spec": {"template": job["spec"]["template"]}})["command"])


def test_no_secret_values_in_the_chart_and_flower_reads_its_own(release):
    values_file, docs = release
    assert not by_kind(docs, "Secret")
    config = by_kind(docs, "ConfigMap")["dpp"]["data"]
    for secret in ("DATABASE_URL", "REDIS_URL", "DPP_SIGNING_KEY", "AWS_SECRET_ACCESS_KEY", "FLOWER_BASIC_AUTH"):
        assert secret not in config
    flower = env(by_kind(docs, "Deployment")["dpp-flower"])
    assert flower["FLOWER_BASIC_AUTH"] == {"secretKeyRef": {"name": "dpp-flower", "key": "FLOWER_BASIC_AUTH"}}


def test_environments_differ_where_they_must(release):
    values_file, docs = release
    config = by_kind(docs, "ConfigMap")["dpp"]["data"]
    accounts = by_kind(docs, "ServiceAccount")
    if values_file == "values-production.yaml":
        assert config["DPP_BILLING_PREFLIGHT_REQUIRED"] == "1" and config["DPP_ENV"] == "production"
        assert "SQS_ENDPOINT_URL" not in config and "S3_ENDPOINT_URL" not in config
    if values_file == "values-pilot.yaml":
        assert config["DPP_BILLING_PREFLIGHT_REQUIRED"] == "0" and config["DPP_ENV"] == "production"
    if values_file != "values-dev.yaml":
        # Each role its own IAM role (IRSA), so each gets least privilege.
        arns = {name: a["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] for name, a in accounts.items()}
        assert len(set(arns.values())) == len(arns) == 4
        assert {"PrometheusRule", "ServiceMonitor", "PodMonitor"} <= {d["kind"] for d in docs}


def test_compose_follows_the_compose_specification():
    result = dc.check_compose()
    assert not result.errors, "\n".join(result.errors)
    assert result.checked == 9


def test_the_compose_check_can_fail(tmp_path, monkeypatch):
    doc = yaml.safe_load(dc.COMPOSE.read_text())
    doc["services"]["api"]["ports"] = 8000           # not a list
    doc["services"]["worker"]["depends_on"]["nope"] = {"condition": "service_healthy"}
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(dc, "COMPOSE", broken)
    errors = dc.check_compose().errors
    assert any(e.startswith("services/api/ports") for e in errors)
    assert any("no service 'nope'" in e for e in errors)


def test_compose_uses_the_names_make_run_uses():
    """The same environment names as dpp/config.py, so one image serves both."""
    doc = yaml.safe_load(dc.COMPOSE.read_text())
    names = set(doc["x-dpp-env"])
    for name in ("DATABASE_URL", "REDIS_URL", "SQS_QUEUE_NAME", "SQS_QUEUE_URL", "SQS_ENDPOINT_URL",
                 "S3_ENDPOINT_URL", "S3_RESULT_BUCKET", "FLOWER_BASIC_AUTH", "DPP_ENV"):
        assert name in names
    conditions = doc["services"]["worker"]["depends_on"]
    assert conditions["migrate"]["condition"] == "service_completed_successfully"
    assert all("healthcheck" in s for n, s in doc["services"].items() if n not in ("aws-init", "migrate"))


def test_beat_may_reach_postgresql_for_the_mirror_watch(release):
    """Beat rebuilds the tenants' budget mirrors from the ledger after a Redis loss:
    a network policy that lets it reach only Redis and AWS would stop that cold."""
    values_file, docs = release
    policies = by_kind(docs, "NetworkPolicy")
    assert "dpp-beat" in policies, f"{values_file} renders no network policy for beat"
    ports = lambda name: {p.get("port") for rule in policies[name]["spec"]["egress"] for p in rule.get("ports", [])}
    postgres = ports("dpp-migrate") - {53}
    assert postgres and postgres <= ports("dpp-beat")

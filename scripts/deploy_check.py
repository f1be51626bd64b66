#!/usr/bin/env python3
"""`make deploy-check`: the chart and docker-compose.yml, validated as a cluster would.

    deploy_check.py                         render + validate everything; exit 1 on any error
    deploy_check.py --extract-compose-schema BINARY
                                            refresh scripts/schemas/compose-spec.json from a
                                            docker-compose binary (it embeds the schema)

1. The Helm chart (helm/dpp) is rendered with a real Helm engine (helm-python-sdk
   embeds Helm's Go SDK: no `helm` binary) for every values file
   (values-dev.yaml, values-pilot.yaml, values-production.yaml), its values checked
   against values.schema.json on the way.
2. Every rendered manifest is validated against the Kubernetes OpenAPI schemas of each
   version in K8S_VERSIONS (kubernetes-validate, strict: an unknown field is an error),
   and a custom resource against the strict CRD schemas in scripts/schemas/crds.
3. docker-compose.yml is validated against the Compose Specification's JSON Schema
   (scripts/schemas/compose-spec.json).
4. The chart's guard rails must refuse what they promise to refuse (GUARD_RAILS):
   rendering with each of those values must fail with its reason.

Prints a table; exits 1 when anything fails. tests/deploy runs the same checks
inside `make test`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "dpp"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
COMPOSE = ROOT / "docker-compose.yml"
VALUES_FILES = ("values-dev.yaml", "values-pilot.yaml", "values-production.yaml")
# The oldest and newest Kubernetes minor versions the chart supports (EKS's standard
# support window when this was written); kubernetes-validate ships their schemas.
K8S_VERSIONS = ("1.32.0", "1.35.0")
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
}

# (what, values file, overrides, the reason the render must fail with)
GUARD_RAILS = (
    ("production refuses an SQS endpoint override", "values-production.yaml",
     {"config": {"SQS_ENDPOINT_URL": "http://moto:5000"}}, "remove the endpoint override SQS_ENDPOINT_URL"),
    ("production refuses an S3 endpoint override", "values-production.yaml",
     {"config": {"S3_ENDPOINT_URL": "https://minio.example"}}, "remove the endpoint override S3_ENDPOINT_URL"),
    ("production refuses an override hidden in extraEnv", "values-production.yaml",
     {"extraEnv": [{"name": "SQS_ENDPOINT_URL", "value": "http://moto:5000"}]}, "endpoint override SQS_ENDPOINT_URL"),
    ("production requires the billing preflight", "values-production.yaml",
     {"config": {"DPP_BILLING_PREFLIGHT_REQUIRED": "0"}}, "DPP_BILLING_PREFLIGHT_REQUIRED=1"),
    ("no secret value in values", "values-pilot.yaml",
     {"config": {"DATABASE_URL": "postgresql://u:p@db/dpp"}}, "config.DATABASE_URL is a secret"),
    ("worker grace longer than the lease", "values-pilot.yaml",
     {"worker": {"terminationGracePeriodSeconds": 30}}, "must be longer than WORKER_LEASE_TTL_SEC"),
    ("workers never scale to zero", "values-pilot.yaml",
     {"worker": {"autoscaling": {"minReplicas": 0}}}, "minReplicas"),
    ("pilot runs DPP_ENV=production", "values-pilot.yaml",
     {"config": {"DPP_ENV": "development"}}, "needs config.DPP_ENV=production"),
)


@dataclass
class Result:
    subject: str
    checked: int = 0
    errors: list[str] = field(default_factory=list)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- Helm -------------------------------------------------------------------------------

def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def render(values_file: str, overrides: dict | None = None) -> list[dict]:
    """The manifests of one release of the chart (name `dpp`, namespace `dpp`)."""
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    values = _deep_merge(yaml.safe_load((CHART / values_file).read_text()) or {}, overrides or {})
    chart.validate_schema(values)
    rendered = chart.render(values=values, name="dpp", namespace="dpp", is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_source"] = path  # not part of the manifest: dropped before validation
                docs.append(doc)
    return docs


def validate_manifest(doc: dict) -> list[str]:
    """Errors of one manifest against Kubernetes' schemas (every version) or its CRD's."""
    import jsonschema
    import kubernetes_validate

    doc = {k: v for k, v in doc.items() if k != "_source"}
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    crd = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd:
        schema = json.loads((SCHEMAS / "crds" / crd).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name} (Kubernetes {version}): {'/'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}")
    return errors


def check_chart(values_file: str) -> Result:
    import helm_python as helm

    result = Result(f"helm/dpp with {values_file}")
    try:
        docs = render(values_file)
    except helm.HelmError as exc:
        result.errors.append(f"render failed: {exc}")
        return result
    names = set()
    for doc in docs:
        key = (doc.get("kind"), doc["metadata"].get("name"))
        if key in names:
            result.errors.append(f"{key[0]}/{key[1]} rendered twice")
        names.add(key)
        result.errors += [f"{doc['_source']}: {e}" for e in validate_manifest(doc)]
        result.checked += 1
    return result


def check_guard_rails() -> Result:
    import helm_python as helm

    result = Result("chart guard rails")
    for what, values_file, overrides, reason in GUARD_RAILS:
        result.checked += 1
        try:
            render(values_file, overrides)
        except helm.HelmError as exc:
            if reason not in str(exc):
                result.errors.append(f"{what}: refused, but not for the reason ({reason!r}): {exc}")
            continue
        result.errors.append(f"{what}: {values_file} + {overrides} rendered; it must be refused")
    return result


# -- Compose ----------------------------------------------------------------------------

def check_compose() -> Result:
    import jsonschema

    result = Result("docker-compose.yml")
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    doc = yaml.safe_load(COMPOSE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for error in validator.iter_errors(doc):
        result.errors.append(f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}")
    services = doc.get("services", {})
    result.checked = len(services)
    # What the schema cannot say: every depends_on names a service that exists.
    for name, service in services.items():
        for dependency in (service.get("depends_on") or {}):
            if dependency not in services:
                result.errors.append(f"services/{name}/depends_on: no service {dependency!r}")
    return result


def extract_compose_schema(binary: Path) -> dict:
    """The Compose Specification schema a docker-compose binary embeds (compose-go's)."""
    data = binary.read_bytes()
    marker = data.find(b'"$id": "compose_spec.json"')
    if marker < 0:
        raise SystemExit(f"{binary}: no embedded compose_spec.json")
    start = data.rfind(b"{", 0, marker)
    depth, in_string, escaped = 0, False, False
    for end in range(start, len(data)):
        byte = data[end:end + 1]
        if in_string:
            escaped = not escaped and byte == b"\\"
            if byte == b'"' and not escaped:
                in_string = False
            continue
        if byte == b'"':
            in_string = True
        elif byte == b"{":
            depth += 1
        elif byte == b"}":
            depth -= 1
            if depth == 0:
                return json.loads(data[start:end + 1])
    raise SystemExit(f"{binary}: the embedded schema is cut short")


# -- main -------------------------------------------------------------------------------

def run_all() -> list[Result]:
    steps = [(f"render and validate {f}", lambda f=f: check_chart(f)) for f in VALUES_FILES]
    steps += [("chart guard rails", check_guard_rails), ("docker-compose.yml", check_compose)]
    results = []
    for index, (label, step) in enumerate(steps, 1):
        started = time.monotonic()
        say(f"[{index}/{len(steps)}] {label} …")
        result = step()
        say(f"[{index}/{len(steps)}] {label}: {'ok' if not result.errors else f'{len(result.errors)} error(s)'}"
            f" ({time.monotonic() - started:.1f} s)")
        results.append(result)
    return results


def table(results: list[Result]) -> str:
    width = max(len(r.subject) for r in results)
    lines = [f"{'subject':<{width}}  checked  errors", f"{'-' * width}  -------  ------"]
    lines += [f"{r.subject:<{width}}  {r.checked:>7}  {len(r.errors):>6}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extract-compose-schema", metavar="BINARY", type=Path,
                        help="write scripts/schemas/compose-spec.json from a docker-compose binary")
    args = parser.parse_args(argv)
    if args.extract_compose_schema:
        schema = extract_compose_schema(args.extract_compose_schema)
        (SCHEMAS / "compose-spec.json").write_text(json.dumps(schema, indent=2) + "\n")
        say(f"✓ wrote {SCHEMAS / 'compose-spec.json'}")
        return 0
    results = run_all()
    print(table(results))
    failed = [e for r in results for e in r.errors]
    for error in failed:
        print(f"✗ {error}")
    print(f"deploy-check: {sum(r.checked for r in results)} checked, {len(failed)} error(s)"
          f" (Kubernetes {', '.join(K8S_VERSIONS)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

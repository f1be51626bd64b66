"""A stored result is a decision proof: `dpp verify` accepts it, and refuses it once touched."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from tests.conftest import assert_invariants
from tests.e2e.test_paid_run import wait_terminal
from tests.support.inputs import DECISION

DPP = str(Path(sys.executable).parent / "dpp")


def test_dpp_verify_accepts_the_stored_envelope_and_names_a_tampering(platform, tenant, clean, tmp_path):
    _, key = tenant
    auth = {"Authorization": f"Bearer {key}"}
    body = {"pack_type": "decision", "inputs": {**DECISION, "method": "topsis", "mode": "detailed"}, "max_cost_usd": "0.50"}
    created = requests.post(f"{platform['url']}/v1/runs", json=body,
                            headers={**auth, "Idempotency-Key": uuid.uuid4().hex}, timeout=10).json()
    run = wait_terminal(f"{platform['url']}/v1/runs/{created['run_id']}", auth)
    assert run["status"] == "COMPLETED", run

    stored = requests.get(f"{platform['url']}/v1/runs/{run['run_id']}/result", headers=auth, timeout=5)
    envelope = stored.json()
    assert envelope["method"] == "topsis" and envelope["pack_version"] == "1.0.0"
    assert "sensitivity" in envelope["result"]["analysis"]
    assert stored.content == json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()  # canonical

    intact = tmp_path / "pack_envelope.json"
    intact.write_bytes(stored.content)
    ok = subprocess.run([DPP, "verify", str(intact)], capture_output=True, text=True, env=platform["env"])
    assert ok.returncode == 0 and ok.stdout.startswith("OK:"), ok.stderr

    envelope["result"]["recommendation"] = "MySQL"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(envelope, indent=2))
    bad = subprocess.run([DPP, "verify", str(tampered)], capture_output=True, text=True, env=platform["env"])
    assert bad.returncode == 1 and "signature does not match" in bad.stderr

    wrong_key = subprocess.run([DPP, "verify", str(intact)], capture_output=True, text=True,
                               env={**platform["env"], "DPP_SIGNING_KEY": "another", "DPP_SIGNING_KEY_ID": "dev"})
    assert wrong_key.returncode == 1
    assert_invariants(clean)


def test_the_pack_catalogue_is_public_and_priced(platform):
    packs = requests.get(f"{platform['url']}/v1/packs", timeout=5)
    assert packs.status_code == 200
    decision = next(p for p in packs.json()["items"] if p["pack_type"] == "decision")
    assert decision["price"]["base_micros"] == 5_000 and decision["price"]["base_usd"] == "0.005"
    assert decision["input_schema"]["required"] == ["question"] and decision["version"] == "1.0.0"

import copy
import json

from dpp.domain import proof
from dpp.domain.canonical import canonical_json, sha256_hex

KEY, KID = b"k" * 32, "k1"


def envelope():
    inputs = {"question": "q?", "options": ["a", "b"]}
    return {"run_id": "r", "inputs": inputs, "input_hash": sha256_hex(inputs), "result": {"verdict": "tie"}}


def test_a_signed_envelope_verifies_and_survives_reformatting():
    signed = proof.sign(envelope(), KEY, KID)
    assert signed["signature"]["alg"] == "HMAC-SHA256" and signed["signature"]["key_id"] == KID
    assert proof.verify(signed, {KID: KEY}).ok
    reindented = json.loads(json.dumps(signed, indent=4))
    assert proof.verify(reindented, {KID: KEY}).ok


def test_any_changed_value_breaks_the_signature():
    signed = proof.sign(envelope(), KEY, KID)
    for mutate in (lambda d: d["result"].update(verdict="recommendation"),
                   lambda d: d.update(run_id="other"),
                   lambda d: d["signature"].update(value="0" * 64)):
        tampered = copy.deepcopy(signed)
        mutate(tampered)
        verdict = proof.verify(tampered, {KID: KEY})
        assert not verdict.ok and "signature" in verdict.reason


def test_changed_inputs_are_caught_even_with_a_matching_signature():
    doc = envelope()
    doc["inputs"]["question"] = "changed?"  # input_hash no longer describes the inputs
    verdict = proof.verify(proof.sign(doc, KEY, KID), {KID: KEY})
    assert not verdict.ok and "input_hash" in verdict.reason


def test_unknown_keys_missing_signatures_and_garbage_are_refused():
    signed = proof.sign(envelope(), KEY, KID)
    assert "unknown key id" in proof.verify(signed, {"other": KEY}).reason
    assert not proof.verify(proof.sign(envelope(), b"other", KID), {KID: KEY}).ok
    assert "no signature" in proof.verify(envelope(), {KID: KEY}).reason
    assert not proof.verify([1, 2], {KID: KEY}).ok


def test_the_signed_bytes_are_canonical():
    signed = proof.sign(envelope(), KEY, KID)
    assert canonical_json(signed) == canonical_json(json.loads(canonical_json(signed)))

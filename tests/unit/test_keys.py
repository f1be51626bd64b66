from dpp.domain import keys


def test_generated_keys_have_the_documented_shape_and_verify():
    key = keys.generate()
    assert key.startswith("dpp_live_") and len(key) == len("dpp_live_") + 32 + 1 + 8
    assert keys.well_formed(key)


def test_a_single_changed_character_fails_the_checksum():
    key = keys.generate()
    body_char = key[10]
    tampered = key[:10] + ("A" if body_char != "A" else "B") + key[11:]
    assert not keys.well_formed(tampered)


def test_garbage_is_not_well_formed():
    for bad in ("", "dpp_live_", "Bearer x", "dpp_test_" + "a" * 32 + "_" + "b" * 8, None):
        assert not keys.well_formed(bad)


def test_only_a_hash_is_stored():
    key = keys.generate()
    assert key not in keys.key_hash(key) and len(keys.key_hash(key)) == 64
    assert keys.display_prefix(key) == key[:15]

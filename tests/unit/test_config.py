import pytest

from dpp.config import Settings, is_loopback_url


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000", "http://localhost:4566", "http://[::1]:9000", "http://127.8.9.1"])
def test_loopback_endpoints_are_recognised(url):
    assert is_loopback_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1.evil.com", "https://sqs.us-east-1.amazonaws.com", "http://10.0.0.1", "", None])
def test_anything_else_is_not_loopback(url):
    assert not is_loopback_url(url)


def test_static_keys_only_for_loopback():
    s = Settings()
    assert s.aws_credentials("http://127.0.0.1:5000")["aws_access_key_id"] == "testing"
    assert s.aws_credentials("https://sqs.us-east-1.amazonaws.com") == {}
    assert s.aws_credentials("http://127.0.0.1.evil.com") == {}


@pytest.mark.parametrize(
    "env",
    [
        {"DPP_ENV": "production", "SQS_ENDPOINT_URL": "http://127.0.0.1:5000"},
        {"DPP_ENV": "production", "S3_ENDPOINT_URL": "http://localhost:5000"},
        {"DPP_ENV": "production", "AWS_ACCESS_KEY_ID": "testing"},
        {"DPP_ENV": "production", "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "x"},
        {"DPP_ENV": "production", "DPP_EXTRA_PACKS": "tests.support.packs:SlowPack"},
    ],
)
def test_production_refuses_loopback_static_keys_and_test_packs(env):
    with pytest.raises(RuntimeError):
        Settings.from_env(env).check_production()


def test_production_with_real_endpoints_and_a_signing_key_starts():
    Settings.from_env({"DPP_ENV": "production", "DPP_SIGNING_KEY": "s3cret", "DPP_SIGNING_KEY_ID": "k2026"}).check_production()


def test_production_accepts_a_roles_temporary_keys():
    Settings.from_env({"DPP_ENV": "production", "DPP_SIGNING_KEY": "s3cret", "DPP_SIGNING_KEY_ID": "k2026",
                       "AWS_ACCESS_KEY_ID": "ASIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "x",
                       "AWS_SESSION_TOKEN": "token"}).check_production()


def test_production_refuses_the_development_signing_key():
    with pytest.raises(RuntimeError):
        Settings.from_env({"DPP_ENV": "production"}).check_production()
    with pytest.raises(RuntimeError):
        Settings.from_env({"DPP_ENV": "production", "DPP_SIGNING_KEY": "x"}).check_production()


def test_fractional_reconcile_threshold_for_tests():
    assert Settings.from_env({"RECONCILE_THRESHOLD_MIN": "0.05"}).reconcile_threshold_min == 0.05

import pytest

from dpp.config import Settings, check_flower, is_loopback_url


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000", "http://localhost:4566", "http://[::1]:9000", "http://127.8.9.1",
                                 # issue 14: each of these slipped past the guard
                                 "http://127.1:5000", "http://0x7f.1", "http://2130706433/", "http://0.0.0.0:4566",
                                 "http://[::]:9000", "http://[::ffff:127.0.0.1]:5000", "http://localhost.:4566",
                                 "http://LOCALHOST:4566", "http://sqs.localhost:4566", "http://0/"])
def test_loopback_endpoints_are_recognised(url):
    assert is_loopback_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1.evil.com", "https://sqs.us-east-1.amazonaws.com", "http://10.0.0.1", "", None,
                                 "http://localhost.evil.com", "http://[::ffff:10.0.0.1]", "http://128.0.0.1"])
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


PRODUCTION = {"DPP_ENV": "production", "DPP_SIGNING_KEY": "k" * 32, "DPP_SIGNING_KEY_ID": "k2026",
              "DATABASE_URL": "postgresql+psycopg2://dpp@db.internal:5432/dpp", "REDIS_URL": "redis://cache.internal:6379/0"}


def test_production_with_real_endpoints_and_a_signing_key_starts():
    Settings.from_env(PRODUCTION).check_production()


def test_production_accepts_a_roles_temporary_keys():
    Settings.from_env({**PRODUCTION, "AWS_ACCESS_KEY_ID": "ASIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "x",
                       "AWS_SESSION_TOKEN": "token"}).check_production()


@pytest.mark.parametrize("env, setting", [
    ({**PRODUCTION, "DATABASE_URL": ""}, "DATABASE_URL"),
    ({k: v for k, v in PRODUCTION.items() if k != "REDIS_URL"}, "REDIS_URL"),
    ({**PRODUCTION, "DPP_SIGNING_KEY": "s3cret"}, "DPP_SIGNING_KEY"),
    ({**PRODUCTION, "DPP_FAULTS": "after_reserve"}, "DPP_FAULTS"),
    ({**PRODUCTION, "DPP_FAULT_TOKENS": "/tmp/tokens"}, "DPP_FAULT_TOKENS"),
    ({**PRODUCTION, "SQS_ENDPOINT_URL": "http://127.1:5000"}, "SQS_ENDPOINT_URL"),
    ({**PRODUCTION, "S3_ENDPOINT_URL": "http://[::ffff:127.0.0.1]:5000"}, "S3_ENDPOINT_URL"),
    ({**PRODUCTION, "DPP_ENV": "prod"}, "DPP_ENV"),
    ({**PRODUCTION, "DPP_ENV": "Production"}, "DPP_ENV"),
])
def test_each_production_refusal_names_its_setting(env, setting):
    """Issue 14: none of these stopped a production start."""
    with pytest.raises(RuntimeError, match=setting):
        Settings.from_env(env).check_production()


def test_an_unknown_environment_is_refused_even_outside_production():
    with pytest.raises(RuntimeError, match="DPP_ENV"):
        Settings.from_env({"DPP_ENV": "staging"}).check_production()
    Settings.from_env({"DPP_ENV": "development"}).check_production()
    Settings.from_env({}).check_production()


def test_production_refuses_the_development_signing_key():
    with pytest.raises(RuntimeError):
        Settings.from_env({"DPP_ENV": "production"}).check_production()
    with pytest.raises(RuntimeError):
        Settings.from_env({"DPP_ENV": "production", "DPP_SIGNING_KEY": "x"}).check_production()


def test_fractional_reconcile_threshold_for_tests():
    assert Settings.from_env({"RECONCILE_THRESHOLD_MIN": "0.05"}).reconcile_threshold_min == 0.05


@pytest.mark.parametrize("argv, environ", [
    (["flower"], {}),
    (["flower", "--port=5555"], {"FLOWER_BASIC_AUTH": ""}),
])
def test_production_flower_needs_authentication(argv, environ):
    with pytest.raises(RuntimeError, match="FLOWER_BASIC_AUTH"):
        check_flower(Settings.from_env(PRODUCTION), argv, environ)


@pytest.mark.parametrize("argv, environ", [
    (["flower"], {"FLOWER_BASIC_AUTH": "ops:s3cret"}),
    (["flower", "--basic-auth=ops:s3cret"], {}),
    (["flower", "--auth=.*@example.com"], {"FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler"}),
])
def test_production_flower_with_authentication_starts(argv, environ):
    check_flower(Settings.from_env(PRODUCTION), argv, environ)


def test_development_flower_needs_nothing():
    check_flower(Settings.from_env({}), ["flower"], {})

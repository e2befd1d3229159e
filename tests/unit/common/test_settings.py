from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.settings import Settings, env_name


def test_defaults_then_environment_then_flags() -> None:
    assert Settings.load(env={}).store_url == "file://./var/store"
    env = {"NEURODISSECT_STORE_URL": "s3://b", "NEURODISSECT_MAX_CONCURRENT_JOBS": "3",
           "NEURODISSECT_S3_SECURE": "true", "RAY_ADDRESS": "10.0.0.1:6379"}
    loaded = Settings.load(env=env)
    assert (loaded.store_url, loaded.max_concurrent_jobs, loaded.s3_secure, loaded.ray_address) == (
        "s3://b", 3, True, "10.0.0.1:6379")
    flagged = Settings.load(env=env, store_url="file:///tmp/x", max_concurrent_jobs=None)
    assert flagged.store_url == "file:///tmp/x" and flagged.max_concurrent_jobs == 3


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(InvalidArgument, match="NEURODISSECT_MAX_CONCURRENT_JOBS"):
        Settings.load(env={"NEURODISSECT_MAX_CONCURRENT_JOBS": "many"})


def test_environment_roundtrip() -> None:
    settings = Settings(auth_token="t", s3_secure=True, port=7, ray_address="r:1")
    assert Settings.load(env=settings.environment()) == settings
    assert env_name("ray_address") == "RAY_ADDRESS"


def test_ports_per_service() -> None:
    settings = Settings()
    assert settings.service_port("explainer") == 50053
    assert settings.service_metrics_port("captioner") == 9104
    assert Settings(metrics_port=0).service_metrics_port("gateway") == 0
    assert Settings(port=6000).service_port("gateway") == 6000

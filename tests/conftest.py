"""Shared fixtures: one local Ray instance per test session (starting Ray costs seconds)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()

"""Shared fixtures: one local Ray instance per test session (starting Ray costs seconds)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One embedded MLflow server for the session, exported as MLFLOW_TRACKING_URI."""
    import os

    from pipeline.tracking import embedded_server

    folder = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with embedded_server(str(folder)) as uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def smoke_workdir(ray_session, tmp_path_factory):
    """A workspace holding the smoke experiment's toy shards (train and validation)."""
    from pipeline.experiment_files import load_experiment
    from pipeline.run import ensure_data

    workdir = str(tmp_path_factory.mktemp("work"))
    ensure_data(load_experiment("smoke"), workdir, progress=False)
    return workdir


@pytest.fixture(scope="session")
def smoke_sweep(smoke_workdir, mlflow_uri):
    """The smoke sweep (d2w64 and d4w128 x patch 4 and 8, 30 steps), run once per session: (experiment, outcomes)."""
    from pipeline.experiment_files import load_experiment
    from pipeline.sweep import run_sweep

    experiment = load_experiment("smoke")
    return experiment, run_sweep(experiment, smoke_workdir)

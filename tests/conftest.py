"""Shared fixtures: one local Ray instance per test session (starting Ray costs seconds), one MLflow server, the
smoke shards and the smoke sweep.

`make test` runs the suite in two pytest-xdist processes (`-n 2 --dist loadgroup`): much of a Ray trial's life is
spent waiting on process start-ups, and the other process fills that time. Each process is a session of its own
(its own Ray, MLflow server and workspace), so the tests that share a session's smoke sweep, and the tests of a
module that share a module-scoped fixture, are sent to one process together: nothing is computed twice."""

import os
import tempfile

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = item._fixtureinfo.name2fixturedefs
        if "smoke_sweep" in item.fixturenames:
            group = "smoke-sweep"
        elif any(d.scope == "module" for defs in fixtures.values() for d in defs):
            group = item.module.__name__
        else:
            continue  # alone: any process may take it
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # A temp dir of its own: ray.init joins the cluster that <RAY_TMPDIR>/ray_current_cluster names (one a
        # cluster test started with `ray start`, in the other test process, say); subprocesses inherit it.
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
        from pipeline.ray_utils import start_local_ray

        start_local_ray(num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False)
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

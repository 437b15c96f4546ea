"""The one package that talks to MLflow: where runs go, the embedded server, a study's runs, and metric logging.

Where runs go: `tracking.tracking_uri` of the experiment, else MLFLOW_TRACKING_URI, else an MLflow tracking server
that this package starts on 127.0.0.1 over `<workdir>/mlflow.db` (SQLite) with artifacts in `<workdir>/mlartifacts`,
so that many processes (Ray workers, concurrent trials) can log at once. On a multi-node cluster, point
MLFLOW_TRACKING_URI at a server every node can reach.

    server.py   the embedded server, its supervisor, and which URI to write to or read from
    runs.py     sweep (parent) and trial (child) runs found by their tags; params, tags, status, artifacts, histories
    logger.py   MetricLogger: metric points sent from a thread of its own, never lost
    spill.py    the file where a MetricLogger keeps the points MLflow has not taken yet
    __main__.py python -m pipeline.tracking serve ... (what embedded_server starts)

Nothing here imports MLflow until it is used.
"""

from pipeline.tracking.logger import MetricLogger
from pipeline.tracking.runs import (
    EXPERIMENT_KIND,
    MAX_PARAM_LENGTH,
    TAG_PARENT,
    TAG_ROLE,
    TAG_RUN_NAME,
    TAG_SWEEP,
    client,
    experiment_id,
    find_run,
    log_analysis,
    log_artifact,
    log_params,
    metric_history,
    set_status,
    set_tags,
    sweep_run,
    trial_run,
    trial_runs_by_name,
)
from pipeline.tracking.server import (
    SERVER_ENV,
    EmbeddedServerGaveUp,
    _free_port,  # noqa: F401 (benchmarks/mlflow_startup.py)
    embedded_server,
    mlflow_server_command,
    reading_uri,
    serve,
    tracking_uri,
    ui_command,
    wait_until_serving,
)

__all__ = [
    "EXPERIMENT_KIND",
    "MAX_PARAM_LENGTH",
    "SERVER_ENV",
    "TAG_PARENT",
    "TAG_ROLE",
    "TAG_RUN_NAME",
    "TAG_SWEEP",
    "EmbeddedServerGaveUp",
    "MetricLogger",
    "client",
    "embedded_server",
    "experiment_id",
    "find_run",
    "log_analysis",
    "log_artifact",
    "log_params",
    "metric_history",
    "mlflow_server_command",
    "reading_uri",
    "serve",
    "set_status",
    "set_tags",
    "sweep_run",
    "trial_run",
    "trial_runs_by_name",
    "tracking_uri",
    "ui_command",
    "wait_until_serving",
]

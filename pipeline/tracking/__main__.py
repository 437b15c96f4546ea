"""python -m pipeline.tracking serve DB ARTIFACTS PORT [OWNER_PID]: the embedded MLflow server (what embedded_server
starts); it exits when the process OWNER_PID is gone."""

import sys

from pipeline.tracking.server import serve

if len(sys.argv) not in (5, 6) or sys.argv[1] != "serve":
    sys.exit("usage: python -m pipeline.tracking serve DB ARTIFACTS PORT [OWNER_PID]")
serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) == 6 else None)

"""Where the embedded MLflow server's start-up goes, and the launcher against `mlflow server`, in the same run.

Times, on fresh SQLite stores, alternating over `--rounds` rounds, seconds from launch to a 200 on /health and CPU
seconds used until then, for `mlflow server --workers 1` (the peer: what the pipeline started before) and for
pipeline.tracking's embedded server (one process, no job runner), and the embedded server's phases as its log gives
them: importing mlflow, creating the store's tables (the alembic migrations of a new file), importing the tracking
app.

    python benchmarks/mlflow_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.layout import Workspace  # noqa: E402
from pipeline.tracking import _free_port, embedded_server, mlflow_server_command  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def mlflow_cli(folder: Path) -> tuple[float, float]:
    """(seconds to /health, CPU seconds of the server's processes by then) for `mlflow server`."""
    port = _free_port()
    command = mlflow_server_command(folder / "mlflow.db", folder / "art", port)
    cmd = [sys.executable, "-m", "mlflow", *command, "--workers", "1"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.1)
    seconds = time.perf_counter() - start
    cpu = _process_tree_cpu(proc.pid)
    subprocess.run(["pkill", "-TERM", "-s", str(proc.pid)], check=False)
    proc.wait()
    return seconds, cpu


def _process_tree_cpu(session: int) -> float:
    """CPU seconds of every live process of a session (the CLI, its uvicorn worker, the job runner)."""
    out = subprocess.run(["ps", "-s", str(session), "-o", "times="], capture_output=True, text=True).stdout
    return float(sum(int(t) for t in out.split()))


def launcher(folder: Path) -> tuple[float, float, dict[str, float]]:
    """(seconds to /health, CPU seconds of the server, {phase: seconds into the start}) for the embedded server."""
    before = children_cpu()
    start = time.perf_counter()
    with embedded_server(str(folder)):
        seconds = time.perf_counter() - start
    cpu = children_cpu() - before  # (the server has exited by now, so its CPU time is counted)
    log = Workspace(str(folder)).mlflow_log.read_text()
    phases = {m[2].split(" sqlite")[0]: float(m[1]) for m in re.finditer(r"^\[\s*([\d.]+) s\] (.+)$", log, re.M)}
    return seconds, cpu, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/mlflow_startup.json")
    args = parser.parse_args()
    results: dict[str, list] = {"mlflow server": [], "embedded server": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name, run in (("mlflow server", mlflow_cli), ("embedded server", launcher)):
                folder = Path(tmp) / f"{name.replace(' ', '-')}-{i}"
                folder.mkdir()
                results[name].append(run(folder))
                print(
                    f"round {i + 1}: {name:<16} {results[name][-1][0]:6.1f} s to serve, "
                    f"{results[name][-1][1]:6.1f} CPU s",
                    flush=True,
                )
    print("\nthe embedded server's start, seconds into it (median of rounds):")
    for phase in results["embedded server"][0][2]:
        print(f"  {phase:<44} {statistics.median(r[2][phase] for r in results['embedded server']):6.2f} s")
    cli = [statistics.median(r[k] for r in results["mlflow server"]) for k in (0, 1)]
    ours = [statistics.median(r[k] for r in results["embedded server"]) for k in (0, 1)]
    print(f"\nmlflow server --workers 1   {cli[0]:6.1f} s to serve, {cli[1]:6.1f} CPU s  (median)")
    print(f"embedded server (launcher)  {ours[0]:6.1f} s to serve, {ours[1]:6.1f} CPU s  (median)")
    print(f"ratio mlflow server / embedded: {cli[0] / ours[0]:.2f}x wall, {cli[1] / max(ours[1], 1e-9):.2f}x CPU")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Real write faults for tests: run a Python snippet in a child process whose output folder has a space limit.

Nothing is mocked: the kernel refuses the writes. Two methods, the first this machine allows (`space_limit_method`):

    namespace  `unshare -rm`: a user + mount namespace in which a tmpfs of `limit_bytes` is mounted over the folder;
               writes fail with ENOSPC ("No space left on device") once the folder holds that much. The folder's
               contents are copied in before the snippet runs and back after it ends, so the test then finds, at the
               same path, exactly what the child left.
    rlimit     where unprivileged user namespaces are not allowed (some CI containers): RLIMIT_FSIZE = `limit_bytes`
               with SIGXFSZ ignored, so a write past that offset of any file fails with EFBIG ("File too large"). A
               cap on each file, not on the folder; the folder is the real one.

DITSCALE_FAULT_METHOD=rlimit (or namespace) forces a method. A snippet that starts Ray calls `init_ray()`, which under
rlimit starts Ray's own processes without the cap (its object store is a file larger than any test's limit) and
applies it in every worker process, where the pipeline's writes happen.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_ENV = "DITSCALE_FAULT_METHOD"
LIMIT_ENV = "DITSCALE_FAULT_FSIZE_BYTES"  # set in the child under rlimit: the cap its Ray workers apply

# In the namespace: keep the real folder reachable at $SAVE, mount the tmpfs over the folder, copy the contents in,
# run the snippet, mirror what it left back to the real folder, exit with the snippet's code. Exit codes 96 (mount),
# 97 (the contents do not fit in the limit) and 98 (copying back) are the script's own failures.
_NAMESPACE_SCRIPT = """
mount --bind "$FAULT_FOLDER" "$FAULT_SAVE" || exit 96
mount -t tmpfs -o size="$FAULT_LIMIT" tmpfs "$FAULT_FOLDER" || exit 96
find "$FAULT_SAVE" -mindepth 1 -maxdepth 1 -exec cp -a -t "$FAULT_FOLDER" {} + || exit 97
"$FAULT_PYTHON" -c "$FAULT_CODE"
rc=$?
find "$FAULT_SAVE" -mindepth 1 -delete || exit 98
find "$FAULT_FOLDER" -mindepth 1 -maxdepth 1 -exec cp -a -t "$FAULT_SAVE" {} + || exit 98
exit $rc
"""

# Under rlimit, first: the cap on the child itself (a soft limit: init_ray lifts it for Ray's own processes).
_RLIMIT_PRELUDE = "from tests.faults import apply_file_size_limit as _cap\n_cap()\n"


@dataclass(frozen=True)
class LimitedRun:
    method: str  # "namespace" (tmpfs, ENOSPC) or "rlimit" (RLIMIT_FSIZE, EFBIG)
    returncode: int
    output: str  # stdout and stderr, interleaved

    @property
    def reason(self) -> str:
        """The strerror a refused write gets under this method, lower case as the pipeline's messages write it."""
        return "no space left on device" if self.method == "namespace" else "file too large"


@functools.cache
def namespace_available() -> bool:
    """Whether an unprivileged user + mount namespace can mount a tmpfs on this machine."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"]
        try:
            return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def space_limit_method() -> str:
    """The method run_with_space_limit uses by default: DITSCALE_FAULT_METHOD, else "namespace" where available, else
    "rlimit"."""
    forced = os.environ.get(METHOD_ENV)
    if forced:
        if forced not in ("namespace", "rlimit"):
            raise ValueError(f"{METHOD_ENV} must be 'namespace' or 'rlimit', got {forced!r}")
        return forced
    return "namespace" if namespace_available() else "rlimit"


def run_with_space_limit(
    code: str, folder: str | os.PathLike, limit_bytes: int, timeout_s: float = 900, method: str | None = None
) -> LimitedRun:
    """Run `code` with `python -c` (cwd: the repository) while `folder` can hold `limit_bytes` (namespace: in all;
    rlimit: per file); returns the method used, the exit code and the output. `folder` must exist; `method` None
    takes space_limit_method()."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} must be an existing folder")
    method = method or space_limit_method()
    if method not in ("namespace", "rlimit"):
        raise ValueError(f"method must be 'namespace' or 'rlimit', got {method!r}")
    env = {k: v for k, v in os.environ.items() if k != LIMIT_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # for Ray workers
    with tempfile.TemporaryDirectory() as save:
        if method == "namespace":
            env.update(
                FAULT_FOLDER=str(folder),
                FAULT_SAVE=save,
                FAULT_LIMIT=str(limit_bytes),
                FAULT_PYTHON=sys.executable,
                FAULT_CODE=code,
            )
            command = ["unshare", "-rm", "sh", "-c", _NAMESPACE_SCRIPT]
        else:
            env[LIMIT_ENV] = str(limit_bytes)
            command = [sys.executable, "-c", _RLIMIT_PRELUDE + code]
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started (its Ray)
            output, _ = proc.communicate()
            raise AssertionError(
                f"the child ran over {timeout_s} s under {method}:\n{output.decode(errors='replace')[-3000:]}"
            ) from None
    text = output.decode(errors="replace")
    if method == "namespace" and proc.returncode in (96, 97, 98):
        raise RuntimeError(f"could not set up the {limit_bytes}-byte folder {folder} (exit {proc.returncode}):\n{text}")
    return LimitedRun(method, proc.returncode, text)


def apply_file_size_limit() -> None:
    """Under rlimit, in the child and in each of its Ray workers (a worker_process_setup_hook): the cap of LIMIT_ENV
    as the soft limit, with SIGXFSZ ignored so a write past it fails with EFBIG instead of killing the process."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def init_ray(num_cpus: int = 1) -> None:
    """ray.init for a snippet of run_with_space_limit (a local instance of `num_cpus` CPUs, logs kept out of the
    output). Under rlimit, Ray's own processes start without the cap and each worker applies it."""

    from pipeline.ray_utils import start_local_ray

    options = dict(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    limit = os.environ.get(LIMIT_ENV)
    if not limit:
        start_local_ray(**options)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        start_local_ray(**options, runtime_env={"worker_process_setup_hook": "tests.faults.apply_file_size_limit"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

"""The layering: import-linter's contracts (pyproject.toml) hold, they do catch a breach, and importing the planning
modules loads no Ray and no MLflow."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_contract_is_kept():
    out = subprocess.run([LINT_IMPORTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"Contracts: {len(contracts())} kept, 0 broken." in out.stdout


def test_a_breach_is_caught(tmp_path):
    """The same contracts over a copy of the tree in which dit_core imports the pipeline: lint-imports fails."""
    for package in ("dit_core", "pipeline", "analysis", "experiments"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    model = tmp_path / "dit_core" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _leak():\n    from pipeline import tracking  # noqa: F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([LINT_IMPORTS], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "dit_core.model -> pipeline.tracking" in out.stdout, out.stdout[-3000:]
    assert "0 broken" not in out.stdout


def test_planning_modules_load_no_ray_and_no_mlflow():
    code = (
        "import sys\n"
        "import pipeline.plan, pipeline.layout, pipeline.manifest, pipeline.experiment_files\n"
        "from pipeline.experiment_files import load_experiment\n"
        "from pipeline.plan import plan_study\n"
        "plan_study(load_experiment('paper_grid'), sys.argv[1])\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent-workspace"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""

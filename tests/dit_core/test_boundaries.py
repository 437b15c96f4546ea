"""dit_core stays a plain PyTorch library: importing it pulls in no Ray, MLflow, WebDataset or pipeline code."""

import subprocess
import sys


def test_dit_core_imports_no_pipeline_dependencies():
    code = (
        "import sys, dit_core, dit_core.interop, dit_core.demo, dit_core.samplers\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('ray', 'mlflow', 'webdataset', 'pipeline', 'torch_fidelity', 'diffusers'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dit_core imported {out.stdout.strip()}"

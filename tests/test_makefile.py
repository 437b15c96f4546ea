"""Every Makefile target's command, in dry mode (`make -n`): it expands, and every script, module, executable,
experiment and DiT preset it names exists (`make bench` once named a renamed preset and failed only when run)."""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dit_core.config import dit_config
from pipeline.cli import build_parser
from pipeline.experiment_files import load_experiment

ROOT = Path(__file__).resolve().parents[1]
PHONY = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1).split()
VENV_BIN = Path(sys.executable).parent  # the environment these tests run in is the one the Makefile builds


def dry_run(target: str) -> list[list[str]]:
    """The commands `make <target>` would run, as argument lists: the environment's set-up too (-W: as if
    pyproject.toml had changed), with VENV pinned whatever the caller's environment says."""
    argv = ["make", "-n", "-W", "pyproject.toml", "-C", str(ROOT), target, "VENV=.venv"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"make -n {target}: {out.stderr}"
    lines = [line for line in out.stdout.splitlines() if line and not line.startswith("make")]
    return [shlex.split(line) for line in lines]


def script_module(path: Path):
    """A script of the repository imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"make_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_makefile_declares_the_readme_targets():
    assert {"setup", "quickstart", "test", "lint", "bench", "demo"} <= set(PHONY)


@pytest.mark.parametrize("target", PHONY)
def test_every_target_names_only_what_exists(target):
    for words in dry_run(target):
        program = words[0]
        if program.startswith(".venv/bin/"):  # ditscale, ruff, python: installed in this environment
            assert (VENV_BIN / Path(program).name).exists(), f"make {target}: {program} is not installed"
        for i, word in enumerate(words):
            if i > 0 and words[i - 1] == "-m":
                assert importlib.util.find_spec(word) is not None, f"make {target}: no module {word}"
            elif word.endswith(".py"):
                assert (ROOT / word).is_file(), f"make {target}: no script {word}"
            elif word.startswith("DiT-"):
                dit_config(word)  # raises, naming the new name, for a renamed or unknown preset
        if Path(program).name == "ditscale":
            args = build_parser().parse_args(words[1:])
            if hasattr(args, "experiment"):
                load_experiment(args.experiment, args.set)
        scripts = [w for w in words if w.endswith(".py")]
        if scripts and scripts[0].startswith("benchmarks/"):
            parse_args = script_module(ROOT / scripts[0]).parse_args
            parse_args(words[words.index(scripts[0]) + 1 :])  # exits (fails the test) on an unknown flag or choice

"""The README and docs/ stay true: every `ditscale` command they show parses, names a real experiment and real
`--set` fields; every `make` target, script and file they name exists; the configuration page lists every field."""

import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.config import ExperimentConfig, config_to_dict, flatten
from pipeline.experiment_files import apply_overrides, load_experiment
from pipeline.prepare import PrepareConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def ditscale_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in shell_lines(page):
            words = shlex.split(line)
            if "ditscale" in words:  # also after `ray job submit ... --`, or `.venv/bin/ditscale`
                start = words.index("ditscale")
            elif any(w.endswith("/ditscale") for w in words):
                start = next(i for i, w in enumerate(words) if w.endswith("/ditscale"))
            else:
                continue
            found.append((page.name, words[start + 1 :]))
    return found


COMMANDS = ditscale_commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 20 and {name for name, _ in COMMANDS} >= {"README.md", "data.md", "training.md"}


@pytest.mark.parametrize("page, argv", COMMANDS, ids=[f"{p}: {' '.join(a)[:60]}" for p, a in COMMANDS])
def test_every_ditscale_command_is_valid(page, argv):
    args = build_parser().parse_args(argv)  # exits (fails the test) on an unknown flag or subcommand
    if args.command == "prepare":
        apply_overrides(PrepareConfig(), args.set)
    elif hasattr(args, "experiment"):
        experiment = args.experiment
        if experiment.endswith((".yaml", ".yml", ".json")) and not (ROOT / experiment).exists():
            pytest.skip(f"{experiment} stands for the reader's own file")
        load_experiment(str(ROOT / experiment) if (ROOT / experiment).exists() else experiment, args.set)


def test_named_make_targets_scripts_and_files_exist():
    makefile = (ROOT / "Makefile").read_text()
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"`make ([a-z-]+)", text):
            assert re.search(rf"^{target}:", makefile, flags=re.M), f"{page.name}: make {target}"
        for script in re.findall(r"\b((?:benchmarks|experiments|docs/examples)/[\w./-]+\.(?:py|sh|yaml))", text):
            assert (ROOT / script).exists(), f"{page.name}: {script}"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / link).exists(), f"{page.name}: link {link}"


def test_the_configuration_page_lists_every_field():
    page = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", page, flags=re.M))
    fields = set(flatten(config_to_dict(ExperimentConfig()))) | {"grid.axes", "grid.variants"}  # mappings, {} here
    assert fields - documented == set(), "fields missing from docs/configuration.md"
    assert documented - fields == set(), "docs/configuration.md lists fields that do not exist"


def test_a_head_on_all_interfaces_is_shown_with_token_authentication_first():
    """`--dashboard-host 0.0.0.0` opens the job API (it runs any code it is sent) to the network: wherever a page
    starts a head that way, the lines just before it say so and export RAY_AUTH_MODE=token first."""
    shown = 0
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("ray start") and "--dashboard-host 0.0.0.0" in line:
                before = "\n".join(lines[max(0, i - 6) : i])
                assert "export RAY_AUTH_MODE=token" in before, f"{page.name}:{i + 1}: no token export before the head"
                assert "runs any code" in before, f"{page.name}:{i + 1}: say that the job API runs any code"
                shown += 1
    assert shown >= 2  # README.md and docs/cluster.md


def test_committed_figures_and_tables_are_named_after_current_presets():
    """A file under analysis/results/ or docs/ named after a preset (`DiT-d6w128_2.png`) names one that exists, and
    none keeps a tiny size's old name (`samples_Nano_2.png`)."""
    from dit_core.config import PRESETS, RENAMED_SIZES

    files = [p for folder in ("analysis/results", "docs") for p in (ROOT / folder).rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        words = set(re.split(r"[_\-.]", path.stem))
        assert not words & set(RENAMED_SIZES), f"{path.relative_to(ROOT)} is named after a renamed preset"
        for size, patch in re.findall(r"DiT-(\w+?)_(\d+)", path.name):
            assert f"DiT-{size}/{patch}" in PRESETS, f"{path.relative_to(ROOT)} names no preset"

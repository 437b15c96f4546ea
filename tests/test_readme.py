"""The README's code example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "0.36 Gflops" in printed and "torch.Size([2, 4, 32, 32])" in printed


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```")[1]
    assert "make quickstart" in head and "make test" in head

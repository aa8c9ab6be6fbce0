"""The README's quick start runs as written (its first ```python block under "## Quick start")."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs_as_written(capsys):
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README quick start", "exec"), {})
    assert capsys.readouterr().out.strip(), "the quick start prints the losses"

"""Every ```python example in the README runs as written (in a temporary working directory)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = re.compile(r"<!-- section:(\w+) -->(.*?)<!-- /section:\1 -->", re.DOTALL)
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    examples = []
    for name, body in SECTION.findall(README.read_text()):
        examples += [(f"{name}-{i}", code) for i, code in enumerate(BLOCK.findall(body))]
    return examples


EXAMPLES = _examples()


def test_readme_has_examples():
    assert any(name.startswith("foundation") for name, _ in EXAMPLES)


@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_readme_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})

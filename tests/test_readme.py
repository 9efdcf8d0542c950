"""The README's Python snippets run as they are, each on its own (a fresh namespace, in a scratch
directory): none relies on a name another snippet defines. Snippets that say they are a fragment
of a torchrun script or need a run's output first (their first line: ``# a fragment``, ``# after``)
are not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUN = [s for s in SNIPPETS if not s.startswith(("# a fragment", "# after"))]


def test_the_readme_has_snippets_to_run():
    assert len(RUN) >= 4 and len(SNIPPETS) - len(RUN) == 3


@pytest.mark.parametrize("snippet", RUN, ids=[f"snippet{i}" for i in range(len(RUN))])
def test_a_readme_snippet_runs_on_its_own(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})

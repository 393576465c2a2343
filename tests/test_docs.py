"""Every code block in docs/ runs, so the documentation cannot rot.

Each page's fenced blocks run in order in one namespace, in a temporary working folder:

* ```` ```python ```` blocks are executed;
* ```` ```pycon ```` blocks are doctests: their printed output must match (``ELLIPSIS`` and
  ``NORMALIZE_WHITESPACE``, as for the docstrings);
* ```` ```bash ```` blocks run in bash with the venv's ``lowbit`` on ``PATH``, except the set-up
  lines ``make ...`` and ``pip install ...`` (they install and test the project itself) and
  ``python examples/...`` lines (``tests/test_examples.py`` runs every example);
* ```` ```text ```` blocks are output, formulas, diagrams and signatures, and are not run.

A fence without one of these languages fails :func:`test_every_code_block_is_tagged`.
The site itself is built with ``mkdocs build --strict`` by ``make docs`` / ``make test``.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
RUNNABLE = ("python", "pycon", "bash")
LANGUAGES = (*RUNNABLE, "text")
NOT_RUN = re.compile(r"^(make |pip install |python examples/)")


#: Pages whose blocks are not self-contained yet (none: every page runs). A page named here is
#: left out of every test below, so keep it empty.
NOT_YET_RUNNABLE: set[str] = set()


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts
                  and str(p.relative_to(DOCS)) not in NOT_YET_RUNNABLE)


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line of the opening fence)`` for each fenced block of a page."""
    text = page.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def runnable_pages() -> list[Path]:
    return [p for p in pages() if any(lang in RUNNABLE for lang, _, _ in blocks(p))]


def test_every_code_block_is_tagged() -> None:
    untagged = [f"{p.relative_to(ROOT)}:{line} ({lang or 'no language'})"
                for p in pages() for lang, _, line in blocks(p) if lang not in LANGUAGES]
    assert not untagged, f"fences need one of {LANGUAGES}: {untagged}"


def test_the_tutorials_and_guides_have_code() -> None:
    """The teaching pages show runnable code, not only prose."""
    for folder in ("tutorials", "guides"):
        for page in (DOCS / folder).glob("*.md"):
            assert page in runnable_pages(), f"{page.relative_to(ROOT)} has no runnable block"


def _run_bash(code: str, where: str, cwd: Path) -> None:
    lines = [line for line in code.splitlines() if line.strip() and not NOT_RUN.match(line)]
    if not lines:
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-3000:]}"


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    parser = doctest.DocTestParser()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for lang, code, line in blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "pycon":
            test = parser.get_doctest(code, namespace, where, str(page), line)
            report: list[str] = []
            runner = doctest.DocTestRunner(optionflags=flags)
            result = runner.run(test, out=report.append, clear_globs=False)
            namespace.update(test.globs)  # DocTest ran in a copy: later blocks see its names
            assert result.failed == 0, "".join(report)
        elif lang == "bash":
            _run_bash(code, where, tmp_path)


def test_every_public_function_has_a_runnable_example() -> None:
    """The style rule: every public function's docstring has a ``>>>`` example (the doctests
    run them; load_checkpoint had none)."""
    import inspect

    import lowbit
    from lowbit import backends

    missing = []
    for module in (lowbit, backends):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and ">>>" not in (inspect.getdoc(obj) or ""):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"public functions without a >>> example: {missing}"

"""A griffe extension: render lowbit's ``Example:`` docstring sections as runnable code.

lowbit's docstrings title their doctest section ``Example:`` (pytest runs them with
``--doctest-modules``); griffe's Google-style parser only knows ``Examples:``, and would render
the doctest as prose (where ``[a]`` followed by ``[b]`` reads as a markdown link). The source
stays as it is; the site sees ``Examples:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` before docstrings are parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _TITLE.sub(r"\1Examples:", obj.docstring.value)

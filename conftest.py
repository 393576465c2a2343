"""Repository-wide pytest set-up (tests/ and the doctests under src/lowbit/).

lowbit compiles its fused C kernels on first use into ``$LOWBIT_CACHE_DIR`` (default
``~/.cache/lowbit``); a test run builds them in a temporary folder instead (shared with its
pytest-xdist workers, which inherit the variable, and removed at exit), so that tests write
only to temporary folders and every run checks a fresh build.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "LOWBIT_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="lowbit-cache-")
    os.environ["LOWBIT_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

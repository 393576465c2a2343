"""Repository-wide pytest set-up (tests/ and the doctests under src/lowbit/).

lowbit compiles its fused C kernels on first use into ``$LOWBIT_CACHE_DIR`` (default
``~/.cache/lowbit``); test runs build them in a temporary folder instead, so that tests write
only to temporary folders and every run checks a fresh build.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("LOWBIT_CACHE_DIR", tempfile.mkdtemp(prefix="lowbit-cache-"))

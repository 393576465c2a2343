"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``).

Each benchmark runs in its own process (so thread settings and warm caches do not leak from one
to the next) and prints its own tables; this script prints a one-line summary per benchmark and
exits non-zero when any of them failed. Extra arguments are passed to every benchmark (e.g.
``--quick``); ``--out-dir DIR`` puts every benchmark's JSON results in ``DIR`` instead of
``benchmarks/results/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    if "--out-dir" in extra:  # (read by each benchmark through _timing.results_path)
        i = extra.index("--out-dir")
        if i + 1 >= len(extra):
            print("run_all.py: --out-dir needs a folder")
            return 2
        env["LOWBIT_BENCH_RESULTS"] = str(Path(extra[i + 1]).resolve())
        del extra[i:i + 2]
    scripts = sorted(HERE.glob("bench_*.py"))
    if not scripts:
        print(f"no benchmarks/bench_*.py found in {HERE}")
        return 1
    summary = []
    for script in scripts:
        print(f"\n===== {script.name} =====\n", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *extra], env=env)
        summary.append((script.name, code, time.perf_counter() - start))
    print("\n===== summary =====")
    for name, code, seconds in summary:
        print(f"{name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())

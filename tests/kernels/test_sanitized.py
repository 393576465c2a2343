"""The GEMM libraries under AddressSanitizer + UndefinedBehaviorSanitizer.

Each ISA library this CPU runs (``lowbit.native.isa_paths()``; the portable one everywhere) is
compiled from its own source and flags together with ``sanitized_harness.c``, which calls the
INT8 x INT8 and INT4 x INT8 entry points on exact-size heap buffers over odd shapes (1-130
rows, K not a multiple of 4 or of the group, N not a multiple of 16), every activation form
and 1-2 threads, and checks the integer results against a plain reference. A read or write
past a buffer, or undefined arithmetic, aborts the harness with the sanitizer's report.
The Python-level fuzzing of the entry points' argument checks is in ``test_isa.py``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lowbit import native

CSRC = Path(native.__file__).resolve().parent / "csrc"
HARNESS = Path(__file__).resolve().parent / "sanitized_harness.c"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer", "-O1", "-g", "-fopenmp"]
C_PATHS = [isa for isa, (source, _, _) in native.ISA_PATHS.items() if source]


@pytest.fixture(scope="module")
def sanitizers(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C compiler, once it has built and run a sanitized program here."""
    cc = native._compiler()  # the compiler lowbit builds its libraries with
    if cc is None:
        pytest.skip("no C compiler: lowbit runs its PyTorch path, there is no C to check")
    folder = tmp_path_factory.mktemp("sanitizers")
    (folder / "probe.c").write_text("int main(void) { return 0; }\n")
    probe = subprocess.run([cc, *SANITIZE, str(folder / "probe.c"), "-o", str(folder / "probe")],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"{cc} cannot build with -fsanitize=address,undefined here "
                    f"(sanitizer runtimes not installed): {probe.stderr.strip()[:200]}")
    return cc


@pytest.mark.parametrize("isa", C_PATHS)
def test_gemm_entry_points_stay_inside_their_buffers(isa: str, sanitizers: str,
                                                     tmp_path: Path) -> None:
    why = native.isa_paths()[isa]
    if why != "available":
        pytest.skip(f"{isa}: {why}")
    source, flags, _ = native.ISA_PATHS[isa]
    exe = tmp_path / f"harness_{isa}"
    build = subprocess.run([sanitizers, *SANITIZE, *flags, f"-I{CSRC}",
                            f'-DLB_SOURCE="{source}"', str(HARNESS), "-o", str(exe), "-lm"],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
                              "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert f"isa {isa} " in run.stdout and " fails 0" in run.stdout, run.stdout

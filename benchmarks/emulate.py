"""Run a benchmark as a CPU with fewer instructions than this one runs it (same cores).

``python benchmarks/emulate.py avx2 bench_llm_layers.py [its options]`` times what an AVX2-only
CPU (AMD Zen 3, Intel up to Comet Lake) runs: lowbit's ``avx2`` kernels, torch.ao's fbgemm
AVX2 kernels, and oneDNN and MKL (FP32, bf16, ``_int_mm``) limited to AVX2.
``avx512_vnni`` times what a CPU with AVX-512 VNNI + BF16 and no AMX (AMD Zen 4) runs: lowbit's
``avx512_vnni`` path and oneDNN without AMX (fbgemm uses no AMX anyway; MKL's FP32 keeps AVX-512).

The limits are the libraries' own switches, set before anything is imported: ``LOWBIT_ISA``,
``ONEDNN_MAX_CPU_ISA``, ``FBGEMM_ENABLE_INSTRUCTIONS`` and ``MKL_ENABLE_INSTRUCTIONS``. ONNX Runtime
has none: it uses every instruction this CPU has (AMX included), so its column is not emulated.
The cores are still this CPU's (their ports, caches and memory), so an emulated table shows
which kernels run and how they compare, not the other CPU's timings; benchmarks print the caps
in their machine line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: ISA name -> the environment that limits every library to it.
CAPS = {
    "avx2": {"LOWBIT_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512_vnni": {"LOWBIT_ISA": "avx512_vnni", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def emulation_env(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the caps of ``isa`` set.

    Raises:
        ValueError: ``isa`` is not one of :data:`CAPS`.

    Example:
        >>> emulation_env("avx2", {})["FBGEMM_ENABLE_INSTRUCTIONS"]
        'AVX2'
    """
    if isa not in CAPS:
        raise ValueError(f"emulate: unknown ISA {isa!r}; choose one of {', '.join(CAPS)}")
    return {**(os.environ if base is None else base), **CAPS[isa]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in CAPS:
        print(f"usage: python benchmarks/emulate.py {{{','.join(CAPS)}}} bench_<name>.py "
              "[options]", file=sys.stderr)
        return 2
    script = Path(args[1])
    script = script if script.is_file() else HERE / script.name
    if not script.is_file():
        print(f"emulate: no benchmark {args[1]!r} (in {HERE})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args[2:]],
                           env=emulation_env(args[0]))


if __name__ == "__main__":
    sys.exit(main())

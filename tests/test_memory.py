"""The output pool: large outputs reuse kept blocks, and never while anything still uses them."""

from __future__ import annotations

import gc
import resource
import threading

import pytest
import torch
from torch import nn

from lowbit import memory
from lowbit.memory import POOL_MIN_BYTES, empty, output_pool_stats, release_output_pool
from lowbit.ptq import quantize_dynamic

BIG = (POOL_MIN_BYTES // 4 // 256, 256)  # float32: exactly POOL_MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LOWBIT_OUTPUT_POOL_MB", raising=False)
    release_output_pool()
    yield
    gc.collect()
    release_output_pool()


def test_a_freed_output_is_reused_and_a_held_one_is_not() -> None:
    reused = output_pool_stats()["reused"]
    a = empty(BIG)
    ptr = a.data_ptr()
    assert ptr % 64 == 0 and a.is_contiguous() and a.dtype == torch.float32
    del a
    b = empty(BIG)
    assert b.data_ptr() == ptr and output_pool_stats()["reused"] == reused + 1
    c = empty(BIG)  # b is held: a new block
    assert c.data_ptr() != ptr


@pytest.mark.parametrize("holder", ["view", "numpy", "slice"])
def test_views_and_numpy_arrays_keep_their_block(holder: str) -> None:
    a = empty(BIG)
    a.fill_(3.0)
    ptr = a.data_ptr()
    kept = {"view": lambda t: t.view(-1), "numpy": lambda t: t.numpy(),
            "slice": lambda t: t[1:, :7]}[holder](a)
    del a
    b = empty(BIG)
    assert b.data_ptr() != ptr
    b.fill_(-1.0)
    assert float(torch.as_tensor(kept).min()) == 3.0  # never overwritten
    del kept
    assert empty(BIG).data_ptr() == ptr  # released with its last user


def test_small_tensors_and_a_zero_limit_bypass_the_pool(monkeypatch) -> None:
    made = output_pool_stats()["blocks_made"]
    empty((10, 10))
    assert output_pool_stats()["blocks_made"] == made
    monkeypatch.setenv("LOWBIT_OUTPUT_POOL_MB", "0")
    release_output_pool()  # re-reads the limit
    reused = output_pool_stats()["reused"]
    del_me = empty(BIG)
    del del_me
    stats = output_pool_stats()
    assert (stats["blocks_made"], stats["reused"], stats["free_bytes"], stats["limit_bytes"]) == (
        made, reused, 0, 0)


def test_the_cache_stays_under_its_limit(monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_OUTPUT_POOL_MB", "2")
    release_output_pool()
    blocks = [empty(BIG) for _ in range(5)]
    del blocks
    stats = output_pool_stats()
    assert stats["limit_bytes"] == 2 << 20 and stats["free_bytes"] == 2 * POOL_MIN_BYTES
    assert release_output_pool() == 2 * POOL_MIN_BYTES and output_pool_stats()["free_bytes"] == 0


def test_bfloat16_and_other_dtypes() -> None:
    t = empty((1024, 1024), torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (1024, 1024)
    t.fill_(1.5)
    assert float(t.float().mean()) == 1.5


def test_concurrent_use_from_threads() -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(50):
                t = empty(BIG)
                t.fill_(float(seed))
                if float(t[-1, -1]) != float(seed) or float(t[0, 0]) != float(seed):
                    raise AssertionError(f"thread {seed} saw another thread's writes at {i}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_large_quantized_outputs_reuse_memory_without_page_faults() -> None:
    """A 4,096-row INT8 linear writes its output into a kept block from the second call on:
    no fresh pages to fault in, and earlier outputs the caller holds stay intact."""
    torch.manual_seed(0)
    q = quantize_dynamic(nn.Sequential(nn.Linear(64, 1536)))
    x = torch.randn(4096, 64)
    with torch.inference_mode():
        y1 = q(x)
        ref = y1.clone()
        q(x)  # its output freed at once: its block goes back to the pool
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            q(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        y2 = q(x * 2)
    assert faults < 200, faults  # a fresh 25 MB output is 6,144 pages
    assert torch.equal(y1, ref) and y2.data_ptr() != y1.data_ptr()
    assert output_pool_stats()["reused"] >= 3
    assert y1.numel() * 4 >= memory.POOL_MIN_BYTES


def test_trim_heap_runs_where_glibc_has_it() -> None:
    """glibc keeps freed heap memory mapped; quantizing calls malloc_trim when it finishes
    (after static quantization of a 1 GiB model: +0.65-0.95 GiB resident, +0.27 trimmed)."""
    import platform

    assert memory.trim_heap() is (platform.libc_ver()[0] == "glibc")

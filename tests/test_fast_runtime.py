"""The allocator setting: big tensors come from the heap (not fresh mmaps), and freed ones stay there."""
import ctypes
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, os, sys, torch
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tuned":
        from mt.fast.runtime import keep_freed_memory
        assert keep_freed_memory()
    x = torch.ones(32 * 2**20)          # 128 MB, over glibc's largest mmap threshold
    mapped = libc.mallinfo2().hblkhd    # bytes held in mmapped blocks
    del x
    print(mapped >= 2**27, libc.mallinfo2().fordblks >= 2**27)  # mapped / freed but kept in the heap
""")


def probe(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"),
                    reason="glibc >= 2.33 only")
def test_big_tensors_come_from_the_heap_and_stay_there():
    assert probe("default") == ["True", "False"]   # glibc's default: its own mmap, unmapped on free
    assert probe("tuned") == ["False", "True"]     # tuned: heap memory, kept for the next step on free


def test_opt_out(monkeypatch):
    from mt.fast.runtime import keep_freed_memory

    monkeypatch.setenv("MT_MALLOC", "system")
    assert keep_freed_memory() is False

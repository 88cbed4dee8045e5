import ctypes
import ctypes.util
import resource
import sys

import pytest

from hat.engine.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_them_in_again():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20  # a 16 MiB tensor's buffer: by default glibc mmaps it afresh each time (~4000 faults)

    def faults_of_one_big_buffer() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pointer = libc.malloc(size)
        ctypes.memset(pointer, 1, size)
        libc.free(pointer)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory()
    faults_of_one_big_buffer()
    assert faults_of_one_big_buffer() < 100

import subprocess
import sys

import pytest

CODE = """
import resource, sys
import numpy as np
from inkpipe.pipeline.memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
def batch():  # a batch of 16 crops (k=30, 224 px: 3 MB each) filled, held, then freed
    crops = [np.ones((30, 224, 224), np.uint16) for _ in range(16)]
for _ in range(3):  # warm up: the heap grows once
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CODE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_memory_is_reused_without_page_faults():
    # 20 batches of 48 MB: ~240 000 fresh 4 KB pages if every buffer were faulted in anew
    default, retained = faults("default"), faults("retain")
    assert retained < 2_000
    assert default > 50 * retained + 10_000  # the default trims and faults again

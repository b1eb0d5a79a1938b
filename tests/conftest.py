import os
import time
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import; the tests always run on its CPU accelerator over gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """speft_ds unlinks DeepSpeed's /dev/shm all-reduce buffers once every rank has mapped them; a process
    killed before that point (the tests kill some on purpose) leaves its 66 MB buffers behind. Remove
    those this session created, so repeated runs on one machine do not fill its RAM."""
    started = time.time()
    yield
    for buffer in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if buffer.stat().st_mtime >= started - 1:
            buffer.unlink(missing_ok=True)

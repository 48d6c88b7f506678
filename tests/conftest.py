import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores on CI: keep each test's torch to its share so parallel helpers don't thrash.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield

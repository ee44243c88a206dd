import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Tiny models run fastest on one thread; more only adds sync overhead (and contention on shared CI cores).
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    """../shared (real data and models); tests that need it skip cleanly on a fresh clone."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED

import os

import pytest

# The suite runs on 2-core machines; one intra-op thread keeps parallel work predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU (still run in CI)")


@pytest.fixture
def rng_seed():
    import torch

    torch.manual_seed(0)
    return 0

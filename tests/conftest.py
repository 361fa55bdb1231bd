import os

import pytest

# The suite runs on 2-core machines; one intra-op thread keeps parallel work predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# amp="auto" picks bf16 on CPUs with native bf16: pin fp32 so that numeric expectations hold on every
# machine; the bf16 path has its own tests, which set MIMBENCH_CPU_BF16=1 themselves.
os.environ.setdefault("MIMBENCH_CPU_BF16", "0")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU (still run in CI)")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A random-init ViT (embed 32, depth 2, 2 heads, patch 8, 32x32) saved as an encoder file."""
    from mimbench.testing import write_tiny_encoder

    return write_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny.safetensors")


@pytest.fixture(scope="session")
def dist_encoder(tmp_path_factory):
    """The same ViT with depth 4, the least the segmentation configs tap (4 blocks)."""
    from mimbench.testing import write_tiny_encoder

    return write_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny4.safetensors", depth=4)


@pytest.fixture
def rng_seed():
    import torch

    torch.manual_seed(0)
    return 0

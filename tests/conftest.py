import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random inputs that differ between tests."""
    g = torch.Generator()
    g.manual_seed(torch.randint(0, 2**31, (1,)).item())
    return g

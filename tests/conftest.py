import os

# Triton kernels run in Triton's interpreter on machines without a GPU. The variable must be set
# before triton is first imported, so it is set here, before any test module imports anything.
if os.environ.get("SUPERMASK_TEST_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (run in CI with -m slow or the full command)")


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield

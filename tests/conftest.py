import ctypes
import ctypes.util
import gc
import os

# Triton kernels run in Triton's interpreter on machines without a GPU. The variable must be set
# before triton is first imported, so it is set here, before any test module imports anything.
if os.environ.get("SUPERMASK_TEST_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# supermask before torch: its thread policy (OMP_WAIT_POLICY=PASSIVE unless set) must be in the environment
# when torch loads OpenMP, or idle threads spin against the other jobs of a shared machine.
import supermask  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests, run with --slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


@pytest.fixture(autouse=True)
def _release_memory_after_slow_tests(request):
    """After a slow test (the torchvision sweep, full-size ImageNet networks): collect its garbage and
    give glibc's freed heap back to the system (malloc_trim), so the suite's peak memory is one
    model's, not the sum of the freed ones (CI's machine has 24 GB)."""
    yield
    if "slow" in request.keywords:
        gc.collect()
        trim = getattr(_LIBC, "malloc_trim", None)
        if trim is not None:
            trim(0)

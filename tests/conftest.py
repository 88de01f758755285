"""Hardware and data gating in one place.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported, so it is
set here, first. Markers: `cuda` (skipped without a GPU), `triton_interpret`, `data` (real data in
../shared/data, skipped with a message when absent), `slow` (skipped unless --run-slow).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow")
    cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow case: run with --run-slow"))
        if "cuda" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; this machine has none"))


def _shared(*parts):
    from lckv.research.data import SharedDataNotFoundError, shared_data_file

    try:
        return shared_data_file(*parts)
    except SharedDataNotFoundError as exc:
        pytest.skip(f"real data not available: {exc}")


@pytest.fixture(scope="session")
def stories260k_files():
    """(checkpoint, tokenizer) paths of the real stories260K model; skips when absent."""
    return _shared("stories260K", "stories260K.bin"), _shared("stories260K", "tok512.bin")


@pytest.fixture(scope="session")
def hotpotqa_file():
    """Path of the 100 real HotpotQA rows; skips when absent."""
    return _shared("hotpotqa", "hotpotqa_train_100.json")



@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the lckv.models registry (fetched once per
    machine into $LCKV_CACHE); skips with the registry's message when it cannot be fetched."""
    from lckv.models import ModelRegistryError, load

    try:
        return load("smollm2-135m-instruct")
    except ModelRegistryError as exc:
        pytest.skip(f"real model not available: {exc}")

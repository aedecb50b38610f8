import pytest
import torch

# One intra-op thread: on a shared 2-core machine two spinning OpenMP threads make small ops stall
# (5-10x slower suites); the tests assert numbers, not speed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

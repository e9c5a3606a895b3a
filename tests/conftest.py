"""Fixtures shared by the test modules."""

import numba
import pytest


@pytest.fixture
def restore_threads():
    """Give the test Numba's thread count back as it found it."""
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)

"""The parity tests run our kernels on at least two threads, even in a pytest-xdist worker that
tests/conftest.py gave one: the kernels split rows, heads and key blocks across threads (and add
per-thread partial sums), and that partitioning is part of what these tests check."""

from __future__ import annotations

import pytest
import torch

KERNEL_THREADS = 2


@pytest.fixture(autouse=True)
def kernel_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, KERNEL_THREADS))
    yield
    torch.set_num_threads(before)

"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, busy 2-core machine two spinning OpenMP threads can make
    small training steps 100x slower; results do not depend on the thread count. Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_onednn() -> Iterator[None]:
    """oneDNN compiles kernels per new conv shape (seconds each on busy cores); native kernels don't.
    Modules with many differently shaped convs opt in with `pytest.mark.usefixtures("no_onednn")`."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = previous

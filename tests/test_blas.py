"""tinyi2v/ops/blas.py: work split over threads with BLAS single-threaded meanwhile."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from tinyi2v import denoiser
from tinyi2v.ops import blas

from conftest import softmax_block_case


def numpy_uses_openblas() -> bool:
    config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return "openblas" in config.get("name", "").lower()


@pytest.fixture
def openblas():
    if not numpy_uses_openblas():
        pytest.skip("numpy is not linked to OpenBLAS here")
    found = blas._openblas()
    assert found is not None, "numpy's OpenBLAS was not found"
    return found


def test_openblas_thread_count_is_set_and_restored(openblas):
    _, get_threads = openblas
    before = get_threads()
    seen = []
    blas.split_run(lambda share: seen.append((list(share), get_threads())), 5)
    assert get_threads() == before
    if before > 1:                                     # every piece ran with one BLAS thread
        assert {count for _, count in seen} == {1} and len(seen) == min(before, 5)
    assert sorted(i for share, _ in seen for i in share) == [0, 1, 2, 3, 4]


def test_a_workers_error_reaches_the_caller_and_blas_is_restored(openblas):
    before = openblas[1]()
    main = threading.get_ident()

    def work(share):
        if threading.get_ident() != main or before == 1:
            raise ValueError("piece failed")

    with pytest.raises(ValueError, match="piece failed"):
        blas.split_run(work, 4)
    assert openblas[1]() == before


def test_without_blas_control_the_work_runs_here_in_one_piece(monkeypatch):
    monkeypatch.setattr(blas, "_openblas", lambda: None)
    seen = []
    blas.split_run(lambda share: seen.append((share, threading.get_ident())), 7)
    assert seen == [(range(7), threading.get_ident())]


def test_softmax_block_is_the_same_split_or_not(monkeypatch):
    """Each head computes what it computes alone: bit-identical to one thread, two samples."""
    cfg, p, rope = softmax_block_case(seed=2)
    a = np.random.default_rng(3).normal(size=(2, 60, 144)).astype(np.float32)
    split = denoiser.softmax_attention_block(p, "blocks.0.", a, rope, cfg, query_chunk=7)
    monkeypatch.setattr(blas, "_openblas", lambda: None)
    one = denoiser.softmax_attention_block(p, "blocks.0.", a, rope, cfg, query_chunk=7)
    np.testing.assert_array_equal(split, one)

"""gather_variable: shards of different sizes from two gloo processes, and the single-process path."""

from __future__ import annotations

import numpy as np
import torch
from retrieval_ddp_worker import SHARD_ROWS, gather_rows, gather_weights, gather_worker, spawn_two

from dual_cross_attention.retrieval.gather import gather_list, gather_variable, gather_variable_with_sizes


def test_single_process_returns_the_input():
    rows = torch.randn(3, 2, requires_grad=True)
    assert gather_variable(rows) is rows
    assert gather_variable_with_sizes(rows) == (rows, [3])
    pids = np.array([4, 5])
    assert gather_variable(pids) is pids or np.array_equal(gather_variable(pids), pids)
    assert gather_list(["a.jpg", "b.jpg"]) == ["a.jpg", "b.jpg"]


def test_two_processes_with_shards_of_3_and_5(tmp_path):
    spawn_two(gather_worker, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    everything = torch.cat([gather_rows(0), gather_rows(1)])  # (8, 2), rows in rank order
    both_weights = gather_weights(0) + gather_weights(1)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["gathered"], everything, rtol=0, atol=0)  # no padding rows
        # Each row's gradient: the sum of both processes' losses, delivered to its owner only.
        start = sum(SHARD_ROWS[:rank])
        torch.testing.assert_close(result["grad"], both_weights[start : start + SHARD_ROWS[rank]])
        assert isinstance(result["pids"], np.ndarray) and result["pids"].dtype == np.int64
        assert result["pids"].tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
        assert result["paths"] == [f"r0_{i}.jpg" for i in range(3)] + [f"r1_{i}.jpg" for i in range(5)]
        assert "differ in dim 0 only" in result["mismatch"]  # raised on both, so neither hangs

"""Global trimming across ranks: two gloo processes under DDP match one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import _dist_worker
from .helpers import CPU_BACKENDS

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_ddp_gradients_equal_single_process_global_trim(tmp_path):
    result = tmp_path / "cases.txt"
    mp.spawn(
        _dist_worker.run_rank,
        args=(2, str(tmp_path / "init"), CPU_BACKENDS, str(result)),
        nprocs=2,
        join=True,
    )
    cases = result.read_text().splitlines()
    assert len(cases) == len(CPU_BACKENDS) * len(_dist_worker.scenarios()) * 4


def test_global_share_matches_sorted_order_on_one_rank(tmp_path):
    """World of one: the distributed radix select is the plain selection."""
    from fused_trim.distributed import global_share

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        losses = torch.tensor([1.0, float("nan"), 3.0, 1.0, float("inf"), -2.0, 0.5, 3.0])
        valid = torch.tensor([True, True, True, True, True, True, False, True])
        for keep, ratio, expected_k, expected_thr in [
            ("hardest", 0.5, 4, 3.0),
            ("hardest", 0.1, 1, float("nan")),
            ("easiest", 0.3, 2, 1.0),
            ("easiest", 1.0, 7, float("nan")),
        ]:
            k_local, k, thr = global_share(losses, valid, ratio, keep, dist.group.WORLD)
            assert int(k_local) == int(k) == expected_k
            torch.testing.assert_close(thr, torch.tensor(expected_thr, dtype=torch.float64), equal_nan=True)
    finally:
        dist.destroy_process_group()

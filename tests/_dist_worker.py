"""Worker of tests/test_distributed.py: one gloo rank checking global trimming under DDP."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fused_trim import trimmed_cross_entropy


def _batch(seed: int, rows: int, all_tied: bool = False):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(rows, 6, generator=gen, dtype=torch.float64)
    if all_tied:  # every loss equal: the kept set is decided by global index alone
        feats[:] = feats[0]
        return feats, torch.full((rows,), 3)
    feats[rows // 2 : rows // 2 + 4] = feats[0]  # exact ties that straddle the ranks
    target = torch.randint(0, 5, (rows,), generator=gen)
    target[rows // 2 : rows // 2 + 4] = target[0]
    target[torch.rand(rows, generator=gen) < 0.15] = -100
    return feats, target


def scenarios():
    """(name, rows of the whole batch, rows of rank 0, ignore all of rank 1)."""
    return [("even", 24, 12, False), ("uneven", 24, 5, False), ("rank1-ignored", 20, 10, True),
            ("all-tied", 24, 5, False)]


def run_rank(rank: int, world: int, init_file: str, backends: list[str], result_file: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    lines = []
    for backend in backends:
        for name, rows, split, ignore_rank1 in scenarios():
            for reduction in ("mean", "sum"):
                for keep, ratio in (("hardest", 0.4), ("easiest", 0.7)):
                    feats, target = _batch(rows, rows, all_tied=name == "all-tied")
                    if ignore_rank1:
                        target[split:] = -100
                    # One process trimming the whole batch: the gradient DDP must reproduce.
                    single = copy.deepcopy(base)
                    ref_loss, ref_info = trimmed_cross_entropy(
                        single(feats), target, ratio, keep=keep, reduction=reduction, backend=backend,
                        return_info=True,
                    )
                    ref_loss.backward()

                    model = DistributedDataParallel(copy.deepcopy(base))
                    part = slice(0, split) if rank == 0 else slice(split, rows)
                    loss, info = trimmed_cross_entropy(
                        model(feats[part]), target[part], ratio, keep=keep, reduction=reduction,
                        backend=backend, return_info=True, process_group=dist.group.WORLD,
                    )
                    loss.backward()
                    case = f"{backend}/{name}/{reduction}/{keep}"
                    for p_ddp, p_ref in zip(model.module.parameters(), single.parameters(), strict=True):
                        torch.testing.assert_close(p_ddp.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=case)
                    torch.testing.assert_close(info.global_loss, ref_loss.detach(), rtol=1e-9, atol=1e-12,
                                               msg=case)
                    assert torch.equal(info.kept, ref_info.kept[part]), case
                    assert int(info.k) == int(ref_info.k), case
                    torch.testing.assert_close(info.threshold, ref_info.threshold, equal_nan=True, msg=case)
                    lines.append(case)
    if rank == 0:
        with open(result_file, "w") as f:
            f.write("\n".join(lines))
    dist.destroy_process_group()

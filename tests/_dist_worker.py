"""Worker of tests/test_distributed.py: one gloo rank checking global trimming under DDP."""

from __future__ import annotations

import copy
import datetime
import os
import sys
import traceback

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
    return [
        ("even", 24, 12, False),
        ("uneven", 24, 5, False),
        ("rank1-ignored", 20, 10, True),
        ("all-tied", 24, 5, False),
    ]


def run(rank: int, job: str, world: int, init_file: str, out_file: str, *args) -> None:
    """Entry point of a spawned rank: run ``job`` and leave without tearing the process group down.

    Tearing a gloo process group down can deadlock: the Python thread drops the last reference
    while holding the GIL and joins gloo's worker threads, and a worker that is freeing a finished
    collective waits for that GIL (pytorch/pytorch#56297). It hung one run in five here and a CI run
    for 90 minutes. So after a final barrier the rank leaves with ``os._exit``: 0 when every check
    passed, 1 with the traceback in ``out_file.rank<r>.err`` otherwise.
    """
    code = 1
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        lines = _JOBS[job](rank, *args)
        dist.barrier()
        if rank == 0:
            with open(out_file, "w") as f:
                f.write("\n".join(lines))
        code = 0
    except BaseException:
        with open(f"{out_file}.rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _check_against_one_process(case, model, single, info, ref_loss, ref_info, part) -> None:
    """A rank's DDP gradients, global loss, kept share, k and threshold equal one process's."""
    for p_ddp, p_ref in zip(model.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(p_ddp.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=case)
    torch.testing.assert_close(info.global_loss, ref_loss.detach(), rtol=1e-9, atol=1e-12, msg=case)
    assert torch.equal(info.kept, ref_info.kept[part]), case
    assert int(info.k) == int(ref_info.k), case
    torch.testing.assert_close(info.threshold, ref_info.threshold, equal_nan=True, msg=case)


def ddp_matches_single_process(rank: int, backends: list[str]) -> list[str]:
    """Two ranks under DDP: each scenario's gradients, loss and kept set equal one process's."""
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
                        single(feats),
                        target,
                        ratio,
                        keep=keep,
                        reduction=reduction,
                        backend=backend,
                        return_info=True,
                    )
                    ref_loss.backward()

                    model = DistributedDataParallel(copy.deepcopy(base))
                    part = slice(0, split) if rank == 0 else slice(split, rows)
                    loss, info = trimmed_cross_entropy(
                        model(feats[part]),
                        target[part],
                        ratio,
                        keep=keep,
                        reduction=reduction,
                        backend=backend,
                        return_info=True,
                        process_group=dist.group.WORLD,
                    )
                    loss.backward()
                    case = f"{backend}/{name}/{reduction}/{keep}"
                    _check_against_one_process(case, model.module, single, info, ref_loss, ref_info, part)
                    lines.append(case)
    return lines


def world_of_one(rank: int) -> list[str]:
    """World of one: the distributed radix select is the plain selection."""
    from fused_trim._common import Keep, TrimOptions
    from fused_trim.distributed import global_share

    losses = torch.tensor([1.0, float("nan"), 3.0, 1.0, float("inf"), -2.0, 0.5, 3.0])
    valid = torch.tensor([True, True, True, True, True, True, False, True])
    lines = []
    for keep, ratio, expected_k, expected_thr in [
        ("hardest", 0.5, 4, 3.0),
        ("hardest", 0.1, 1, float("nan")),
        ("easiest", 0.3, 2, 1.0),
        ("easiest", 1.0, 7, float("nan")),
    ]:
        opts = TrimOptions(keep_ratio=ratio, keep=Keep[keep.upper()])
        k_local, k, thr = global_share(losses, valid, opts, dist.group.WORLD)
        assert int(k_local) == int(k) == expected_k, (keep, ratio, int(k_local), int(k))
        torch.testing.assert_close(thr, torch.tensor(expected_thr, dtype=torch.float64), equal_nan=True)
        lines.append(f"{keep}/{ratio}")
    return lines


def near_ties_in_low_precision(rank: int, backends: list[str]) -> list[str]:
    """bf16/fp16 logits whose fp32 losses differ but round to a few equal values: the ranks keep
    exactly the set one process keeps (the fp32 ranking), not the first indices of each tie."""
    world = dist.get_world_size()
    rows, split = 40, 13
    lines = []
    for dtype in (torch.bfloat16, torch.float16):
        base = torch.randn(11, generator=torch.Generator().manual_seed(3)).to(dtype)
        x = base.repeat(rows, 1)
        # Row i: logit 0 raised by i units in the last place, so the fp32 losses (target 5) strictly
        # increase with i while their roundings to the input dtype repeat.
        bits = x[:, 0].view(torch.int16) + torch.arange(rows, dtype=torch.int16) * (1 if base[0] > 0 else -1)
        x[:, 0] = bits.view(dtype)
        target = torch.full((rows,), 5)
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(4))
        x, target = x[perm].contiguous(), target[perm]
        part = slice(0, split) if rank == 0 else slice(split, rows)
        for backend in backends:
            for keep in ("hardest", "easiest"):
                case = f"{backend}/{dtype}/{keep}"
                single = x.clone().requires_grad_(True)
                ref_loss, ref_info = trimmed_cross_entropy(
                    single, target, 0.3, keep=keep, backend=backend, return_info=True
                )
                ref_loss.backward()
                rounded = ref_info.losses[ref_info.kept].unique().numel() < int(ref_info.k)
                assert rounded, f"{case}: the kept losses should repeat after rounding"
                mine = x[part].clone().requires_grad_(True)
                loss, info = trimmed_cross_entropy(
                    mine,
                    target[part],
                    0.3,
                    keep=keep,
                    backend=backend,
                    return_info=True,
                    process_group=dist.group.WORLD,
                )
                loss.backward()
                assert torch.equal(info.kept, ref_info.kept[part]), case
                # DDP would average the ranks' gradients: each rank's is world x its rows' share.
                torch.testing.assert_close(
                    (mine.grad.float() / world), single.grad[part].float(), rtol=1e-2, atol=1e-4, msg=case
                )
                lines.append(case)
    return lines


class _HeadLoss(torch.nn.Module):
    """A body and an LM head whose forward returns the fused trimmed loss (DDP wraps the call)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 13)

    def forward(self, feats, target, ratio, **kw):
        from fused_trim import trimmed_linear_cross_entropy

        return trimmed_linear_cross_entropy(
            self.body(feats),
            self.head.weight,
            target,
            ratio,
            linear_bias=self.head.bias,
            return_info=True,
            chunk_size=5,
            **kw,
        )


def lm_head_ddp(rank: int, backends: list[str]) -> list[str]:
    """trimmed_linear_cross_entropy with a process group under DDP: a model whose head is the
    fused op gets, on two ranks, the gradients of one process on the whole batch."""
    torch.manual_seed(1)
    base = _HeadLoss().double()
    lines = []
    for backend in backends:
        for name, rows, split, ignore_rank1 in scenarios():
            for reduction in ("mean", "sum"):
                for keep, ratio in (("hardest", 0.4), ("easiest", 0.7)):
                    feats, target = _batch(rows + 7, rows, all_tied=name == "all-tied")
                    target = target.clamp(max=12)
                    if ignore_rank1:
                        target[split:] = -100
                    kw = dict(keep=keep, reduction=reduction, backend=backend)
                    # The easiest-kept cases also rank by a score (selective language modelling).
                    offset = torch.randn(rows, generator=torch.Generator().manual_seed(rows)).double()
                    offset = offset if keep == "easiest" else None
                    single = copy.deepcopy(base)
                    ref_loss, ref_info = single(feats, target, ratio, score_offset=offset, **kw)
                    ref_loss.backward()

                    model = DistributedDataParallel(copy.deepcopy(base))
                    part = slice(0, split) if rank == 0 else slice(split, rows)
                    loss, info = model(
                        feats[part],
                        target[part],
                        ratio,
                        process_group=dist.group.WORLD,
                        score_offset=None if offset is None else offset[part],
                        **kw,
                    )
                    loss.backward()
                    case = f"lm/{backend}/{name}/{reduction}/{keep}"
                    _check_against_one_process(case, model.module, single, info, ref_loss, ref_info, part)
                    lines.append(case)
    return lines


def score_offset_ddp(rank: int, backends: list[str]) -> list[str]:
    """Two ranks with a ``score_offset`` (few distinct values: ties across the ranks, one NaN):
    the kept set, threshold score, loss and gradients of one process on the whole batch."""
    torch.manual_seed(2)
    base = torch.nn.Linear(6, 5).double()
    lines = []
    for backend in backends:
        for name, rows, split, ignore_rank1 in scenarios():
            for reduction, keep, ratio in (("mean", "hardest", 0.4), ("sum", "easiest", 0.6)):
                feats, target = _batch(rows, rows, all_tied=name == "all-tied")
                if ignore_rank1:
                    target[split:] = -100
                gen = torch.Generator().manual_seed(rows + split)
                offset = torch.tensor([0.0, 0.5, -0.5, 1.0], dtype=torch.float64)[
                    torch.randint(0, 4, (rows,), generator=gen)
                ]
                offset[1] = float("nan")  # a NaN score: first under "hardest", last under "easiest"
                kw = dict(keep=keep, reduction=reduction, backend=backend, return_info=True)
                single = copy.deepcopy(base)
                ref_loss, ref_info = trimmed_cross_entropy(single(feats), target, ratio, score_offset=offset, **kw)
                ref_loss.backward()

                model = DistributedDataParallel(copy.deepcopy(base))
                part = slice(0, split) if rank == 0 else slice(split, rows)
                loss, info = trimmed_cross_entropy(
                    model(feats[part]),
                    target[part],
                    ratio,
                    score_offset=offset[part],
                    process_group=dist.group.WORLD,
                    **kw,
                )
                loss.backward()
                case = f"offset/{backend}/{name}/{reduction}/{keep}"
                _check_against_one_process(case, model.module, single, info, ref_loss, ref_info, part)
                torch.testing.assert_close(info.scores, ref_info.scores[part], equal_nan=True, msg=case)
                lines.append(case)
    return lines


def signed_zeros(rank: int, backends: list[str]) -> list[str]:
    """Losses of exactly -0.0 and +0.0 (a zero cross-entropy times a negative or positive class
    weight) split across the ranks: one value, so the global kept set is the first k in global
    index order, as one process keeps it, under both keep rules."""
    rows, split = 16, 7
    sign = torch.randint(0, 2, (rows,), generator=torch.Generator().manual_seed(9))
    target = sign.clone()  # class 0 weighs -1 (a -0.0 loss), class 1 weighs +2 (+0.0)
    logits = torch.full((rows, 3), -200.0, dtype=torch.float64)
    logits[torch.arange(rows), target] = 0.0  # log(1 + 2 exp(-200)) == 0: an exact zero loss
    weight = torch.tensor([-1.0, 2.0, 1.0], dtype=torch.float64)
    target[3] = -100
    part = slice(0, split) if rank == 0 else slice(split, rows)
    _, info = trimmed_cross_entropy(
        logits, target, weight=weight, reduction="none", backend="reference", return_info=True
    )
    assert sorted(set(map(str, info.losses[target != -100].tolist()))) in (["-0.0", "0.0"], ["0.0"])
    lines = []
    for backend in backends:
        for keep in ("hardest", "easiest"):
            for ratio in (0.3, 0.6):
                case = f"zeros/{backend}/{keep}/{ratio}"
                kw = dict(keep=keep, reduction="sum", backend=backend, return_info=True, weight=weight)
                _, ref_info = trimmed_cross_entropy(logits, target, ratio, **kw)
                _, info = trimmed_cross_entropy(logits[part], target[part], ratio, process_group=dist.group.WORLD, **kw)
                assert torch.equal(info.kept, ref_info.kept[part]), case
                assert int(info.k) == int(ref_info.k), case
                lines.append(case)
    return lines


_JOBS = {
    "signed-zeros": signed_zeros,
    "ddp": ddp_matches_single_process,
    "score-offset": score_offset_ddp,
    "one": world_of_one,
    "near-ties": near_ties_in_low_precision,
    "lm-head": lm_head_ddp,
}

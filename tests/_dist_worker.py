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


# The (reduction, keep, ratio) settings of the DDP jobs. A covering set, not the full product: the
# setting rotates with the backend and the scenario, so each backend meets every setting (one per
# scenario) and every scenario meets both reductions and both keep rules over the backends.
_SETTINGS = [("mean", "hardest", 0.4), ("sum", "easiest", 0.7), ("mean", "easiest", 0.7), ("sum", "hardest", 0.4)]


def _covering_cases(backends: list[str]):
    """(backend, scenario, reduction, keep, ratio): each backend with each scenario once."""
    for b, backend in enumerate(backends):
        for s, scenario in enumerate(scenarios()):
            yield (backend, scenario, *_SETTINGS[(b + s) % len(_SETTINGS)])


def _check_against_one_process(case, model, single, info, ref_loss, ref_info, part) -> None:
    """A rank's DDP gradients, global loss, kept share, k and threshold equal one process's."""
    for p_ddp, p_ref in zip(model.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(p_ddp.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=case)
    torch.testing.assert_close(info.global_loss, ref_loss.detach(), rtol=1e-9, atol=1e-12, msg=case)
    assert torch.equal(info.kept, ref_info.kept[part]), case
    assert int(info.k) == int(ref_info.k), case
    torch.testing.assert_close(info.threshold, ref_info.threshold, equal_nan=True, msg=case)


def _linear_under_ddp(rank: int, backends: list[str], offsets: bool) -> list[str]:
    """Two ranks under DDP (a linear model, each scenario of the covering set): gradients, loss,
    kept set, k and threshold equal one process's on the whole batch. With ``offsets``, ranked by a
    ``score_offset`` of few distinct values (ties across the ranks) and one NaN."""
    torch.manual_seed(2 if offsets else 0)
    base = torch.nn.Linear(6, 5).double()
    lines = []
    for backend, (name, rows, split, ignore_rank1), reduction, keep, ratio in _covering_cases(backends):
        feats, target = _batch(rows, rows, all_tied=name == "all-tied")
        if ignore_rank1:
            target[split:] = -100
        offset = None
        if offsets:
            gen = torch.Generator().manual_seed(rows + split)
            offset = torch.tensor([0.0, 0.5, -0.5, 1.0], dtype=torch.float64)[
                torch.randint(0, 4, (rows,), generator=gen)
            ]
            offset[1] = float("nan")  # a NaN score: first under "hardest", last under "easiest"
        kw = dict(keep=keep, reduction=reduction, backend=backend, return_info=True)
        # One process trimming the whole batch: the gradient DDP must reproduce.
        single = copy.deepcopy(base)
        ref_loss, ref_info = trimmed_cross_entropy(single(feats), target, ratio, score_offset=offset, **kw)
        ref_loss.backward()

        model = DistributedDataParallel(copy.deepcopy(base))
        part = slice(0, split) if rank == 0 else slice(split, rows)
        loss, info = trimmed_cross_entropy(
            model(feats[part]),
            target[part],
            ratio,
            score_offset=None if offset is None else offset[part],
            process_group=dist.group.WORLD,
            **kw,
        )
        loss.backward()
        case = f"{'offset/' if offsets else ''}{backend}/{name}/{reduction}/{keep}"
        _check_against_one_process(case, model.module, single, info, ref_loss, ref_info, part)
        if offsets:
            torch.testing.assert_close(info.scores, ref_info.scores[part], equal_nan=True, msg=case)
        lines.append(case)
    return lines


def ddp_matches_single_process(rank: int, backends: list[str]) -> list[str]:
    """Two ranks under DDP: each scenario's gradients, loss and kept set equal one process's."""
    return _linear_under_ddp(rank, backends, offsets=False)


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
    for d, dtype in enumerate((torch.bfloat16, torch.float16)):
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
        for b, backend in enumerate(backends):
            # Each backend meets both dtypes and both keep rules: the rule alternates (a covering set).
            keep = ("hardest", "easiest")[(b + d) % 2]
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
    for backend, (name, rows, split, ignore_rank1), reduction, keep, ratio in _covering_cases(backends):
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
    return _linear_under_ddp(rank, backends, offsets=True)


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


def _full_grads_close(
    case: str, model: torch.nn.Module, single: torch.nn.Module, atol: float = 1e-12, rtol: float = 1e-9
) -> None:
    """Every parameter's gradient, gathered from its shards, equals one process's (by name)."""
    expected = dict(single.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert names == list(expected), case
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, expected[name].grad, rtol=rtol, atol=atol, msg=f"{case}: {name}")


class _BodyHead(torch.nn.Module):
    """A body and an LM head; the forward returns the body's hidden states, or with a criterion the
    loss computed inside the forward (where FSDP2 has gathered the root's parameters)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 13)  # 13 rows: uneven shards (7 and 6) on two ranks

    def forward(self, feats, target=None, criterion=None):
        hidden = self.body(feats)
        if criterion is None:
            return hidden
        return criterion(hidden, target, self.head.weight, self.head.bias)


def sharded_head(rank: int, backends: list[str]) -> list[str]:
    """DTensor head parameters passed to the op directly: gathered for the call, their gradients
    DTensors in the parameter's placements holding the mean of the ranks' gradients; a DTensor
    input is an error saying what to pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from fused_trim import TrimmedLinearCrossEntropyLoss, trimmed_linear_cross_entropy

    world = dist.get_world_size()
    rows, split = 22, 9
    feats, target = _batch(5, rows)
    target = target.clamp(max=12)
    part = slice(0, split) if rank == 0 else slice(split, rows)
    torch.manual_seed(3)
    base = _BodyHead().double()
    upstream = 1.7  # a non-unit upstream gradient
    lines = []
    for backend in backends:
        for keep, group in (("hardest", dist.group.WORLD), ("easiest", None)):
            case = f"direct/{backend}/{keep}/{'global' if group else 'local'}"
            kw = dict(keep=keep, backend=backend, chunk_size=4)
            # Every rank runs the one-process oracle: with a group, the whole batch trimmed at once;
            # without, each rank's own trimmed loss, whose gradients FSDP2 would average.
            single = copy.deepcopy(base.head)
            hidden_all = base.body(feats).detach().requires_grad_(True)
            parts = [slice(None)] if group is not None else [slice(0, split), slice(split, rows)]
            for p in parts:
                ref = trimmed_linear_cross_entropy(
                    hidden_all[p], single.weight, target[p], 0.4, linear_bias=single.bias, **kw
                )
                (ref * upstream / len(parts)).backward()

            head = copy.deepcopy(base.head)
            fully_shard(head)
            assert type(head.weight).__name__ == "DTensor", case
            hidden = hidden_all.detach()[part].clone().requires_grad_(True)
            loss = trimmed_linear_cross_entropy(
                hidden, head.weight, target[part], 0.4, linear_bias=head.bias, process_group=group, **kw
            )
            (loss * upstream).backward()
            for p in (head.weight, head.bias):
                assert type(p.grad).__name__ == "DTensor" and p.grad.placements == p.placements, case
            _full_grads_close(case, head, single)
            # The rank's own input gradient: world x its rows' share under a group (averaging
            # follows), its own loss's otherwise.
            scale = world if group is not None else len(parts)
            torch.testing.assert_close(hidden.grad, hidden_all.grad[part] * scale, rtol=1e-9, atol=1e-12, msg=case)
            lines.append(case)

    # A replicated DTensor weight: an all-reduce brings back the mean of the ranks' gradients.
    mesh = init_device_mesh("cpu", (world,))
    weight = distribute_tensor(base.head.weight.detach(), mesh, [Replicate()]).requires_grad_(True)
    hidden = base.body(feats).detach()
    mine = trimmed_linear_cross_entropy(hidden[part], weight, target[part], 0.5, keep="easiest")
    mine.backward()
    assert weight.grad.placements == (Replicate(),)
    single = base.head.weight.detach().clone().requires_grad_(True)
    for p in (slice(0, split), slice(split, rows)):
        (trimmed_linear_cross_entropy(hidden[p], single, target[p], 0.5, keep="easiest") / world).backward()
    torch.testing.assert_close(weight.grad.to_local(), single.grad, rtol=1e-9, atol=1e-12)
    lines.append("replicate")

    # The loss module with a sharded head: holding the sharded parameters (built after
    # fully_shard) and called outside the forward, or given the head's parameters inside it.
    for inside in (False, True):
        case = f"module/{'inside' if inside else 'outside'}-forward"
        single = copy.deepcopy(base)
        ref = trimmed_linear_cross_entropy(
            single.body(feats), single.head.weight, target, 0.4, linear_bias=single.head.bias, chunk_size=4
        )
        ref.backward()
        model = copy.deepcopy(base)
        fully_shard(model.body)
        fully_shard(model)
        if inside:
            criterion = TrimmedLinearCrossEntropyLoss(None, 0.4, chunk_size=4, process_group=dist.group.WORLD)
            loss = model(feats[part], target[part], criterion)
        else:
            criterion = TrimmedLinearCrossEntropyLoss(
                model.head.weight, 0.4, linear_bias=model.head.bias, chunk_size=4, process_group=dist.group.WORLD
            )
            loss = criterion(model(feats[part]), target[part])
        loss.backward()
        torch.testing.assert_close(criterion.info.global_loss, ref.detach(), rtol=1e-9, atol=1e-12, msg=case)
        _full_grads_close(case, model, single)
        lines.append(case)

    try:
        trimmed_linear_cross_entropy(distribute_tensor(hidden, mesh, [Replicate()]), weight, target, 0.5)
    except TypeError as exc:
        assert "input must be a plain tensor" in str(exc) and "to_local()" in str(exc), exc
    else:
        raise AssertionError("a DTensor input did not raise")
    lines.append("dtensor-input")
    return lines


def _tiny_lm(kind: str, vocab: int, positions: int, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(dtype).train()


def _fully_shard_lm(model: torch.nn.Module, head_unit: bool) -> None:
    """Each decoder layer and the root their own FSDP2 unit; the head in the root's, or its own."""
    from torch.distributed.fsdp import fully_shard

    llama = hasattr(model, "model")
    for block in model.model.layers if llama else model.transformer.h:
        fully_shard(block)
    if head_unit:
        # A tied head shares its weight with the input embedding, so one unit holds both.
        fully_shard(model.lm_head if llama else [model.transformer.wte, model.lm_head])
    fully_shard(model)


def _tokens(rows: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[torch.rand(rows, length, generator=gen) < 0.3] = -100
    return ids, labels


def hf_fsdp(rank: int) -> list[str]:
    """The Hugging Face patch on FSDP2-sharded tiny causal LMs (Llama; GPT-2 with tied embeddings),
    the head in the root's unit or its own, with global trimming over the two ranks: every
    parameter's gradient equals one process's trimming the whole batch with the unpatched model's
    logits, and at keep 1.0 the loss is the unpatched model's own; the patched step never holds the
    ``(N, V)`` logits."""
    from fused_trim import trimmed_cross_entropy
    from fused_trim.integrations.transformers import apply_fused_trim, get_trim_state

    world, group = dist.get_world_size(), dist.group.WORLD
    vocab = 97
    ids, labels = _tokens(4, 13, vocab, seed=1)
    n_valid = int((labels[:, 1:] != -100).sum())  # the Trainer's num_items_in_batch over all ranks
    part = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven: 1 and 3 sequences
    lines = []
    # (model, head in its own unit, keep ratio, keep, num_items_in_batch, patch before sharding)
    for kind, head_unit, ratio, keep, with_items, patch_first in (
        ("llama", False, 0.5, "hardest", False, False),
        ("llama", True, 0.5, "easiest", True, True),
        ("gpt2", False, 0.5, "hardest", True, True),
        ("gpt2", True, 0.5, "hardest", False, False),
        ("llama", True, 1.0, "hardest", True, False),
        ("gpt2", False, 1.0, "hardest", True, False),
    ):
        case = f"hf/{kind}/{'head-unit' if head_unit else 'root-unit'}/{ratio}/{keep}/items={with_items}"
        base = _tiny_lm(kind, vocab, 32, torch.float64)
        items = {"num_items_in_batch": torch.tensor(n_valid)} if with_items else {}
        single = copy.deepcopy(base)
        if ratio == 1.0:  # the unpatched model's own loss
            ref = single(input_ids=ids, labels=labels, **items).loss
        else:
            logits = single(input_ids=ids).logits
            shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            ref = trimmed_cross_entropy(logits.reshape(-1, vocab), shifted.reshape(-1), ratio, keep=keep)
        ref.backward()

        model = copy.deepcopy(base)
        patch = dict(keep=keep, process_group=group)
        if patch_first:
            apply_fused_trim(model, ratio, **patch)
            assert get_trim_state(copy.deepcopy(model)).op_kwargs["process_group"] is group, case
            _fully_shard_lm(model, head_unit)
        else:
            _fully_shard_lm(model, head_unit)
            apply_fused_trim(model, ratio, **patch)
        out = model(input_ids=ids[part], labels=labels[part], **items)
        assert out.logits is None, case
        # transformers' own loss upcasts the logits to fp32: its precision bounds the comparison.
        atol, rtol = (1e-6, 1e-6) if ratio == 1.0 else (1e-10, 1e-9)
        if ratio == 1.0:
            own = copy.deepcopy(base)(input_ids=ids[part], labels=labels[part], **items).loss
            torch.testing.assert_close(out.loss, own.to(out.loss.dtype), rtol=rtol, atol=atol, msg=case)
        # The Trainer multiplies a loss normalised by the global num_items_in_batch by the number
        # of processes; FSDP2 averages the gradients.
        (out.loss * (world if with_items else 1)).backward()
        _full_grads_close(case, model, single, atol=atol, rtol=rtol)
        lines.append(case)
    lines.append(_hf_fsdp_memory(rank))
    return lines


def _peak_rss_rise(step) -> int:
    """Bytes the resident set's high-water mark rises over the resident set during ``step()``."""

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = status("VmRSS")
    step()
    return status("VmHWM") - before


def _hf_fsdp_memory(rank: int) -> str:
    """The patched step's peak stays below one copy of the rank's fp32 logits; the unpatched
    step's (the meter's own check) does not."""
    from fused_trim.integrations.transformers import apply_fused_trim

    vocab, rows, length = 16384, 4, 128
    logits_bytes = rows * length * vocab * 4
    ids, labels = _tokens(rows, length, vocab, seed=2 + rank)
    rise = {}
    models = {}
    for patched in (True, False):
        model = _tiny_lm("llama", vocab, length, torch.float32)
        _fully_shard_lm(model, head_unit=True)
        if patched:
            apply_fused_trim(model, 0.5, process_group=dist.group.WORLD, chunk_size=64)
        model(input_ids=ids[:1, :8], labels=labels[:1, :8]).loss.backward()  # warm-up, small
        models[patched] = model
    for patched in (True, False):  # patched first: nothing large has been freed before it
        rise[patched] = _peak_rss_rise(lambda m=models[patched]: m(input_ids=ids, labels=labels).loss.backward())
    assert rise[True] < logits_bytes / 2 and rise[False] > logits_bytes, (rise, logits_bytes)
    return f"memory/rank{rank}: patched {rise[True] / 2**20:.1f} MiB, unpatched {rise[False] / 2**20:.1f} MiB"


def fsdp2(rank: int, backends: list[str]) -> list[str]:
    """FSDP2: the op with DTensor head parameters, then (with transformers) the Hugging Face patch,
    in one spawn."""
    lines = sharded_head(rank, backends)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return lines
    return lines + hf_fsdp(rank)


def groups(rank: int, backends: list[str]) -> list[str]:
    """Group trimming with ``process_group=``: each rank's groups its own, the selection over every
    rank's groups. Two ranks match one process on the whole batch with rank 1's ids shifted past
    rank 0's (ties then go to the lower rank, as to the lower id): kept set, k, threshold, global
    loss, and each rank's gradient (scaled for averaging) equal to the world size times its part
    of the single process's."""
    from fused_trim import trimmed_linear_cross_entropy

    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(7)
    rows, t, c, d = 6, 5, 7, 4
    split = 2  # rank 0 holds rows [0, 2), rank 1 rows [2, 6)
    logits = torch.randn(rows, t, c, generator=gen, dtype=torch.float64)
    hidden = torch.randn(rows, t, d, generator=gen, dtype=torch.float64)
    head = torch.randn(c, d, generator=gen, dtype=torch.float64)
    target = torch.randint(0, c, (rows, t), generator=gen)
    target[torch.rand(rows, t, generator=gen) < 0.2] = -100
    target[3] = -100  # a group of rank 1 with no valid position
    logits[4] = logits[0]  # groups tied across the ranks
    hidden[4] = hidden[0]
    target[4] = target[0]
    local_ids = torch.randint(0, 4, (rows, t), generator=gen)
    part = slice(0, split) if rank == 0 else slice(split, rows)
    shift = torch.zeros(rows, 1, dtype=torch.int64)
    shift[split:] = split * t  # rank 1's ids past rank 0's positions in the whole batch
    modes = [
        ("rows", {"keep_ratio": 0.5}, "hardest", "mean"),
        ("ids", {"keep_count": 3}, "easiest", "sum"),
        ("ids", {"keep_threshold": 1.8, "min_kept": 2}, "hardest", "mean"),
        ("rows", {"keep_threshold": 1.5, "min_kept": 0}, "easiest", "none"),
    ]
    lines = []
    for backend in backends:
        for op in ("ce", "lm"):
            if backend == "triton" and op == "ce":
                continue  # (interpreted; its CE path under a process group is every backend's)
            for layout, rule, keep, reduction in modes[: 2 if backend == "triton" else 4]:
                whole_ids = "rows" if layout == "rows" else local_ids + shift
                ids = "rows" if layout == "rows" else local_ids[part].contiguous()

                kw = dict(rule, keep=keep, reduction=reduction, backend=backend, return_info=True)

                def call(x, tgt, g, pg=None, op=op, kw=kw):
                    if op == "ce":
                        return trimmed_cross_entropy(x.permute(0, 2, 1), tgt, group_ids=g, process_group=pg, **kw)
                    return trimmed_linear_cross_entropy(x, head, tgt, group_ids=g, process_group=pg, **kw)

                source = logits if op == "ce" else hidden
                x_all = source.clone().requires_grad_(True)
                ref, ref_info = call(x_all, target, whole_ids)
                ref.sum().backward()
                x = source[part].clone().requires_grad_(True)
                out, info = call(x, target[part].contiguous(), ids, dist.group.WORLD)
                out.sum().backward()
                case = f"{backend}/{op}/{layout}/{rule}/{keep}/{reduction}"
                assert torch.equal(info.kept, ref_info.kept[part]), case
                assert int(info.k) == int(ref_info.k), case
                torch.testing.assert_close(info.threshold, ref_info.threshold, equal_nan=True, msg=case)
                torch.testing.assert_close(info.global_loss, ref.detach().sum(), rtol=1e-9, atol=1e-12, msg=case)
                scale = 1 if reduction == "none" else world
                torch.testing.assert_close(x.grad, scale * x_all.grad[part], rtol=1e-9, atol=1e-12, msg=case)
                if layout == "rows":
                    assert torch.equal(info.group_kept, ref_info.group_kept[part]), case
                lines.append(case)
    return lines


_JOBS = {
    "signed-zeros": signed_zeros,
    "ddp": ddp_matches_single_process,
    "score-offset": score_offset_ddp,
    "one": world_of_one,
    "near-ties": near_ties_in_low_precision,
    "lm-head": lm_head_ddp,
    "fsdp2": fsdp2,
    "groups": groups,
}

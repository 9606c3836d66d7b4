"""torch.compile(fullgraph=True) through the public API, recompile counts, and (on CUDA) no host
synchronisation and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fused_trim import TrimmedCrossEntropyLoss, native, trimmed_cross_entropy
from fused_trim.schedules import LinearSchedule

HAS_CUDA = torch.cuda.is_available()
COMPILE_BACKENDS = (["native"] if native.is_available(torch.device("cpu")) else []) + (["triton"] if HAS_CUDA else [])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def forward(self, x, t, keep_ratio, backend: str):
        return trimmed_cross_entropy(self.body(x), t, keep_ratio, backend=backend, label_smoothing=0.05)


def _step(model, x, t, ratio, backend):
    model.zero_grad(set_to_none=True)
    loss = model(x, t, ratio, backend)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.skipif(not COMPILE_BACKENDS, reason="no compiled backend here (native not built, no CUDA)")
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_fullgraph_and_no_recompile_across_a_schedule(backend):
    dev = "cuda" if backend == "triton" else "cpu"
    torch.manual_seed(0)
    net = _Net().to(dev)
    x = torch.randn(64, 12, device=dev)
    t = torch.randint(0, 10, (64,), device=dev)
    t[::9] = -100
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=counter)
    schedule = LinearSchedule(epochs=5)
    ratio = torch.tensor(1.0, device=dev)
    for epoch in range(5):
        ratio.fill_(schedule(epoch))  # the schedule moves the ratio; the graph must not change
        got_loss, got_grads = _step(compiled, x, t, ratio, backend)
        ref_loss, ref_grads = _step(net, x, t, ratio, backend)
        torch.testing.assert_close(got_loss, ref_loss)
        for a, b in zip(got_grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 5 keep ratios"


@pytest.mark.skipif(not COMPILE_BACKENDS, reason="no compiled backend here (native not built, no CUDA)")
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_module_follows_its_schedule_without_recompiling(backend):
    """TrimmedCrossEntropyLoss inside a compiled step: the schedule's ratio is a graph input."""
    dev = "cuda" if backend == "triton" else "cpu"
    torch.manual_seed(0)
    body = torch.nn.Linear(12, 10).to(dev)
    x = torch.randn(64, 12, device=dev)
    t = torch.randint(0, 10, (64,), device=dev)
    compiled_crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=5), backend=backend, label_smoothing=0.05)
    eager_crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=5), backend=backend, label_smoothing=0.05)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(lambda x, t: compiled_crit(body(x), t), fullgraph=True, backend=counter)
    frames_after_first = None
    for epoch in range(5):
        compiled_crit.set_epoch(epoch)
        eager_crit.set_epoch(epoch)
        got = step(x, t)
        if frames_after_first is None:
            frames_after_first = counter.frame_count
        ref = eager_crit(body(x), t)
        torch.testing.assert_close(got, ref)
        assert int(compiled_crit.info.k) == int(eager_crit.info.k) == round(64 * (1.0 - 0.2 * epoch))
        assert compiled_crit.last_keep_ratio == eager_crit.last_keep_ratio
    assert counter.frame_count == frames_after_first, "a schedule step recompiled the loss"


def _ratio_copies(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """``.to(...)`` calls on a graph input of the loss module's ratio (a host-to-device copy on CUDA)."""
    ratio_inputs = {n for n in gm.graph.nodes if n.op == "placeholder" and "ratio" in n.name}
    assert ratio_inputs, "the ratio is not a graph input"
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to" and n.args[0] in ratio_inputs]


@pytest.mark.skipif(not COMPILE_BACKENDS, reason="no compiled backend here (native not built, no CUDA)")
@pytest.mark.parametrize("new_device", [False, True])
def test_compiled_module_reads_a_ratio_tensor_on_the_input_device(new_device):
    """The compiled step reads the module's ratio tensor of the input's device, which set_epoch
    fills in place: no copy of the ratio in the graph (on CUDA a synchronising host-to-device copy
    per step). A device the module has not met (simulated by dropping the CPU one) gets its tensor
    from the first compiled step, once; the next step recompiles once to read it."""
    backend = COMPILE_BACKENDS[0]
    dev = torch.device("cuda" if backend == "triton" else "cpu")
    torch.manual_seed(0)
    body = torch.nn.Linear(12, 10).to(dev)
    x = torch.randn(64, 12, device=dev)
    t = torch.randint(0, 10, (64,), device=dev)
    crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=5), backend=backend)
    if new_device:
        crit._ratio.on.clear()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x, t: crit(body(x), t), fullgraph=True, backend=capture)
    tensors = []
    for epoch in range(5):
        crit.set_epoch(epoch)
        step(x, t)
        assert int(crit.info.k) == round(64 * (1.0 - 0.2 * epoch))
        assert crit.last_keep_ratio == LinearSchedule(epochs=5)(epoch)
        tensors.append(crit._ratio.on[dev])
    crit.set_epoch(0)  # the ratio moves on; the last forward's stays what it was
    assert crit.last_keep_ratio == LinearSchedule(epochs=5)(4)
    assert all(r is tensors[0] for r in tensors), "the device's ratio tensor was made more than once"
    if new_device:
        assert len(graphs) == 2 and len(_ratio_copies(graphs[0])) == 1
    else:
        assert len(graphs) == 1
    assert _ratio_copies(graphs[-1]) == []


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_compiled_module_step_on_cuda_never_syncs():
    body = torch.nn.Linear(12, 10).cuda()
    x = torch.randn(64, 12, device="cuda")
    t = torch.randint(0, 10, (64,), device="cuda")
    crit = TrimmedCrossEntropyLoss(LinearSchedule(epochs=5), backend="triton")
    torch._dynamo.reset()
    step = torch.compile(lambda x, t: crit(body(x), t).backward(), fullgraph=False)
    for epoch in range(2):  # the first step makes the CUDA ratio tensor, the second recompiles to read it
        crit.set_epoch(epoch)
        step(x, t)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in range(2, 5):
            crit.set_epoch(epoch)
            step(x, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert crit._ratio.on[torch.device("cuda", torch.cuda.current_device())].item() == LinearSchedule(epochs=5)(4)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_cuda_forward_backward_never_sync_and_capture_in_a_graph(backend):
    if backend == "native" and not native.is_available(torch.device("cuda")):
        pytest.skip("native CUDA kernels not built")
    x = torch.randn(512, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (512,), device="cuda")
    ratio = torch.tensor(0.3, device="cuda")
    trimmed_cross_entropy(x, t, ratio, backend=backend).backward()  # warm-up: compile, load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trimmed_cross_entropy(x, t, ratio, backend=backend).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            x.grad = None
            trimmed_cross_entropy(x, t, ratio, backend=backend).backward()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    with torch.cuda.graph(graph):
        loss = trimmed_cross_entropy(x, t, ratio, backend=backend)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    expected = trimmed_cross_entropy(x.detach(), t, ratio, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["ce", "linear_ce"])
@pytest.mark.parametrize("tensor_ratio", [False, True], ids=["float-ratio", "tensor-ratio"])
def test_reference_compiles_fullgraph(op, tensor_ratio):
    """The reference (the fallback where nothing is compiled) traces with fullgraph=True: masks, not
    data-dependent shapes; value and gradients equal eager, ignored rows and a NaN row included."""
    from fused_trim import trimmed_linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(9, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 9, (23,), generator=gen)
    t[::5] = -100
    x[7] = float("nan")  # ignored row: must not reach a gradient

    def step(x, w, b, ratio, keep, reduction):
        if op == "ce":
            return trimmed_cross_entropy(
                torch.nn.functional.linear(x, w, b),
                t,
                ratio,
                keep=keep,
                reduction=reduction,
                backend="reference",
                label_smoothing=0.1,
            )
        return trimmed_linear_cross_entropy(
            x,
            w,
            t,
            ratio,
            linear_bias=b,
            keep=keep,
            reduction=reduction,
            backend="reference",
            chunk_size=4,
            label_smoothing=0.1,
        )

    t[7] = -100
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for ratio in (1.0, 0.4):
        for keep in ("hardest", "easiest"):
            for reduction in ("mean", "none"):
                r = torch.tensor(ratio) if tensor_ratio else ratio
                results = []
                for fn in (compiled, step):
                    leaves = [v.clone().requires_grad_(True) for v in (x, w, b)]
                    out = fn(*leaves, r, keep, reduction)
                    results.append((out.detach(), torch.autograd.grad(out.sum(), leaves)))
                torch.testing.assert_close(results[0][0], results[1][0])
                for a, e in zip(results[0][1], results[1][1], strict=True):
                    # (through an outside F.linear, the NaN row's zero logit gradient meets its NaN)
                    assert op == "ce" or torch.isfinite(a).all()
                    torch.testing.assert_close(a, e, equal_nan=True)

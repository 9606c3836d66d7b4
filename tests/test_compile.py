"""torch.compile(fullgraph=True) through the public API, recompile counts, and (on CUDA) no host
synchronisation and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fused_trim import TrimmedCrossEntropyLoss, native, trimmed_cross_entropy
from fused_trim.schedules import LinearSchedule

HAS_CUDA = torch.cuda.is_available()
COMPILE_BACKENDS = (["native"] if native.is_available(torch.device("cpu")) else []) + (
    ["triton"] if HAS_CUDA else []
)


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

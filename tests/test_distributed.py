"""Global trimming across ranks: two gloo processes under DDP match one process on the whole batch.

Every rank runs in a spawned process (``tests/_dist_worker.py``) under a deadline, so a collective
that never completes fails the test instead of hanging the suite.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch.distributed as dist

from . import _dist_worker
from .helpers import CPU_BACKENDS, LM_BACKENDS, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_ddp_gradients_equal_single_process_global_trim(tmp_path):
    cases = spawn_ranks(tmp_path, "ddp", 2, CPU_BACKENDS)
    assert len(cases) == len(CPU_BACKENDS) * len(_dist_worker.scenarios())


def test_low_precision_ranks_on_fp32_losses_like_one_process(tmp_path):
    cases = spawn_ranks(tmp_path, "near-ties", 2, CPU_BACKENDS)
    assert len(cases) == len(CPU_BACKENDS) * 2


def test_lm_head_ddp_gradients_equal_single_process_global_trim(tmp_path):
    backends = [b for b in CPU_BACKENDS if b in LM_BACKENDS]
    cases = spawn_ranks(tmp_path, "lm-head", 2, backends)
    assert len(cases) == len(backends) * len(_dist_worker.scenarios())


def test_score_offset_ddp_equals_single_process_global_trim(tmp_path):
    cases = spawn_ranks(tmp_path, "score-offset", 2, CPU_BACKENDS)
    assert len(cases) == len(CPU_BACKENDS) * len(_dist_worker.scenarios())


def test_signed_zero_losses_rank_as_one_value_across_ranks(tmp_path):
    cases = spawn_ranks(tmp_path, "signed-zeros", 2, CPU_BACKENDS)
    assert len(cases) == len(CPU_BACKENDS) * 4


def test_global_share_matches_sorted_order_on_one_rank(tmp_path):
    assert len(spawn_ranks(tmp_path, "one", 1)) == 4


def test_a_failing_rank_fails_the_test_with_its_traceback(tmp_path):
    """The harness itself: an assertion in a rank must surface, not hang or pass."""
    with pytest.raises(pytest.fail.Exception, match="KeyError"):
        spawn_ranks(tmp_path, "no-such-job", 2)


def test_fsdp2_sharded_head_and_hf_patch_equal_one_process_without_the_logits(tmp_path, monkeypatch):
    """FSDP2 on two gloo ranks: DTensor head parameters passed to the op directly (and to
    TrimmedLinearCrossEntropyLoss), and the Hugging Face patch on sharded Llama and tied GPT-2
    models, the head in the root's unit or its own (see ``_dist_worker.fsdp2``)."""
    # A fixed mmap threshold: every large block is mapped and unmapped, so the resident set follows
    # the live tensors (glibc raises the threshold dynamically otherwise, and keeps freed blocks).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    backends = [b for b in CPU_BACKENDS if b in LM_BACKENDS]
    cases = spawn_ranks(tmp_path, "fsdp2", 2, backends)
    assert len(cases) == len(backends) * 2 + 4 + (7 if importlib.util.find_spec("transformers") else 0), cases

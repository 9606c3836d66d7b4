"""Grid select, step 4: one program turns per-block tie counts into exclusive prefix sums."""

import triton
import triton.language as tl


@triton.jit
def grid_scan_kernel(ties_ptr, num_blocks, BLOCK: tl.constexpr):
    """In place: ``ties[b] <- sum(ties[:b])``, so each block knows the ties before it."""
    carry = tl.zeros((), tl.int64)
    for start in range(0, num_blocks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < num_blocks
        t = tl.load(ties_ptr + idx, mask=mask, other=0)
        tl.store(ties_ptr + idx, carry + tl.cumsum(t, 0) - t, mask=mask)
        carry += tl.sum(t, 0)

"""Peak memory of one training step of a tiny Hugging Face causal LM, patched by
``fused_trim.integrations.transformers.apply_fused_trim`` or not, at a vocabulary where the logits
dominate (CPU).

Each variant runs in its own child process: the model and the batch are built and a small warm-up
step runs (native op build, thread pools, autograd caches), then the resident-set high-water mark is
reset (``/proc/self/clear_refs``) and the figure is the rise of that mark over the resident set
during one forward + backward. Parameter gradients exist from the warm-up, so the figure is what the
step itself adds: activations, logits and their gradient.

    python -m benchmarks.hf_memory                        # vocab 32000, seq 512, batch 2
    python -m benchmarks.hf_memory --vocab 32000 --seq 512 --batch 1 --keep 0.5

A benchmark, not a test: the figures depend on the machine (Linux only: it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # children import this checkout's fused_trim

VARIANTS = ("unpatched", "patched-auto", "patched-reference")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(variant: str, vocab: int, seq: int, batch: int, keep: float) -> None:
    import transformers

    from fused_trim.integrations.transformers import apply_fused_trim

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).float().train()
    if variant != "unpatched":
        apply_fused_trim(model, keep, backend=variant.removeprefix("patched-"))
    ids = torch.randint(0, vocab, (batch, seq))
    small = ids[:, :16]
    model(input_ids=small, labels=small).loss.backward()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status("VmRSS")
    model(input_ids=ids, labels=ids).loss.backward()
    print(json.dumps({"peak_extra": _status("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keep", type=float, default=1.0, help="keep ratio of the patched model")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        _child(a.child, a.vocab, a.seq, a.batch, a.keep)
        return
    logits = a.batch * a.seq * a.vocab * 4
    print(f"vocab {a.vocab}, seq {a.seq}, batch {a.batch}, keep {a.keep}: fp32 logits {logits / 2**20:.0f} MiB")
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.hf_memory",
            "--child",
            variant,
            "--vocab",
            str(a.vocab),
            "--seq",
            str(a.seq),
            "--batch",
            str(a.batch),
            "--keep",
            str(a.keep),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"{variant:>18}: failed\n{proc.stderr[-2000:]}")
            continue
        peak = json.loads(lines[-1])["peak_extra"]
        print(f"{variant:>18}: peak step memory {peak / 2**20:7.0f} MiB ({peak / logits:.2f} x the logits)")


if __name__ == "__main__":
    main()

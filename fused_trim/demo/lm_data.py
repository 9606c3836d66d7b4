"""Text for the LM demo: the Python standard library's own source, split by module, BPE-tokenised.

Every Python installation ships its standard library as ``.py`` source, so the demo trains a language
model on real text without a download. The data depend on the Python version (the summary records it):

- the *modules* are every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except
  ``site-packages`` / ``dist-packages`` (installed packages, not the standard library), the
  platform's ``config-*`` folder, and every file inside a folder named ``test``, ``tests`` or
  ``idle_test`` (test suites are half of the library's bytes and mostly boilerplate);
- a module is a *validation* module when ``crc32`` of its path (relative, ``/``-separated) is
  ``0 mod 10``, a *reference* module (the clean subset Rho-1's reference model trains on) when it is
  ``1 mod 10``; every non-validation module is a training module. The rule depends on nothing but the
  path, so a given Python version always gives the same split, and validation text is never trained on;
- a byte-level BPE (``tokenizers``) is trained on the training modules only, with one special token
  ``<|endoftext|>`` between modules; each split's token stream is cut into non-overlapping sequences
  of ``seq_len + 1`` tokens (inputs and their shifted targets).
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LMData", "stdlib_modules", "split_of", "load_lm_data", "corrupt_sequences", "EOT"]

EOT = "<|endoftext|>"
EXCLUDED_TOP = ("site-packages", "dist-packages")
TEST_FOLDERS = ("test", "tests", "idle_test")


def split_of(relative_path: str) -> str:
    """``"validation"``, ``"reference"`` or ``"train"``: the split of the module at ``relative_path``
    (``/``-separated, relative to the stdlib folder). Reference modules are training modules too."""
    bucket = zlib.crc32(relative_path.encode("utf-8")) % 10
    return "validation" if bucket == 0 else "reference" if bucket == 1 else "train"


def stdlib_modules(root: str | Path | None = None) -> list[str]:
    """Sorted ``/``-separated paths of the standard library's source modules under ``root``
    (default: this interpreter's ``sysconfig.get_paths()["stdlib"]``), without tests and packages."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    paths = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] in EXCLUDED_TOP or parts[0].startswith("config-"):
            continue
        if any(part in TEST_FOLDERS for part in parts[:-1]):
            continue
        paths.append("/".join(parts))
    return sorted(paths)


@dataclass
class LMData:
    """Tokenised sequences ``(S, seq_len + 1)`` (int64) of each split, and what made them."""

    train: Tensor  # every training module (reference modules included)
    reference: Tensor  # the reference modules only: Rho-1's clean subset
    validation: Tensor
    vocab_size: int
    seq_len: int
    modules: dict[str, list[str]]  # split -> module paths
    python: str  # the interpreter version whose standard library this is
    tokenizer: Any = field(repr=False)  # the trained ``tokenizers.Tokenizer``

    def describe(self) -> str:
        """One line for the summary: source, split sizes and tokens."""
        m = self.modules
        return (
            f"Python {self.python} stdlib: {len(m['train'])} training modules ({self.train.numel():,} tokens, "
            f"of which {len(m['reference'])} reference modules), {len(m['validation'])} validation modules "
            f"({self.validation.numel():,} tokens); byte-level BPE, vocabulary {self.vocab_size}, "
            f"sequences of {self.seq_len} tokens"
        )


def _read(root: Path, paths: list[str]) -> list[str]:
    # Source files are UTF-8 (PEP 3120); a stray undecodable byte must not stop the demo.
    return [(root / p).read_text(encoding="utf-8", errors="replace") for p in paths]


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _sequences(tokenizer, texts: list[str], seq_len: int) -> Tensor:
    eot = [tokenizer.token_to_id(EOT)]
    ids = np.concatenate([np.asarray(e.ids + eot, dtype=np.int64) for e in tokenizer.encode_batch(texts)])
    n = len(ids) // (seq_len + 1)
    return torch.from_numpy(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


@functools.lru_cache(maxsize=2)
def load_lm_data(vocab_size: int = 4096, seq_len: int = 128, root: Path | None = None) -> LMData:
    """The split, tokenised standard library (see the module's docstring). ``root`` defaults to this
    interpreter's stdlib folder. Cached per arguments: the tokenizer trains in a few seconds."""
    if vocab_size < 257 + 1:
        raise ValueError(f"--vocab-size must be >= 258 (256 bytes, the separator and a merge), got {vocab_size}")
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    modules: dict[str, list[str]] = {"train": [], "reference": [], "validation": []}
    for path in stdlib_modules(base):
        split = split_of(path)
        modules["validation" if split == "validation" else "train"].append(path)
        if split == "reference":
            modules["reference"].append(path)
    if not modules["train"] or not modules["validation"]:
        raise ValueError(f"no standard-library source found under {base} (is this Python installed without it?)")
    train_texts = _read(base, modules["train"])
    tokenizer = _train_tokenizer(train_texts, vocab_size)
    by_path = dict(zip(modules["train"], train_texts, strict=True))
    return LMData(
        train=_sequences(tokenizer, train_texts, seq_len),
        reference=_sequences(tokenizer, [by_path[p] for p in modules["reference"]], seq_len),
        validation=_sequences(tokenizer, _read(base, modules["validation"]), seq_len),
        vocab_size=tokenizer.get_vocab_size(),
        seq_len=seq_len,
        modules=modules,
        python=".".join(map(str, sys.version_info[:3])),
        tokenizer=tokenizer,
    )


def corrupt_sequences(sequences: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Shuffle the tokens of ``round(fraction * S)`` randomly chosen sequences (each its own random
    order); the others are returned unchanged. Returns the corrupted copy and the bool mask ``(S,)``
    of corrupted sequences.

    Shuffling keeps each sequence's tokens, so the corruption cannot be spotted from rare tokens the
    way uniformly random tokens (all but a few of them rare in a 4k vocabulary) could: only the order,
    which is what a language model learns, is destroyed.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--noise must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(20_000 + seed)
    count, length = sequences.shape
    noisy = torch.zeros(count, dtype=torch.bool)
    noisy[torch.randperm(count, generator=g)[: round(fraction * count)]] = True
    out = sequences.clone()
    rows = noisy.nonzero().flatten()
    order = torch.rand(len(rows), length, generator=g).argsort(dim=1)
    out[rows] = torch.gather(sequences[rows], 1, order)
    return out, noisy

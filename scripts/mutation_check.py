"""Does the fast suite still catch the bugs it must? Plant each deliberate bug in a copy of the repo.

Every mutation below is one regular expression on a distinctive line of one backend's source
(``reference.py``, the shared ``_common.py``, the Triton kernels, the native C++ sources); it is
applied in a temporary copy of the working tree, and the test suite then runs there with ``-x``,
test files most likely to catch it first, so a caught mutation costs seconds. The report gives,
per mutation and backend, the first failing test, or ``SURVIVED``. The script exits non-zero if a
mutation survives or no longer applies (its pattern matched nothing: the code moved, update the
pattern), or if a C++ mutation does not compile.

    python scripts/mutation_check.py                     # all of them
    python scripts/mutation_check.py --only tie --only nan  # names containing "tie" or "nan"
    python scripts/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The files most likely to catch a planted bug run first; every other test file follows.
FIRST = [
    "tests/test_reference.py",
    "tests/test_contract.py",
    "tests/test_keep_rules.py",
    "tests/test_groups.py",
    "tests/test_score_offset.py",
    "tests/test_head_options.py",
    "tests/test_linear_ce.py",
    "tests/test_native_linear.py",
    "tests/test_native.py",
    "tests/test_triton_edges.py",
    "tests/test_triton_grid_select.py",
    "tests/test_triton_spatial.py",
    "tests/test_triton_linear_ce.py",
    "tests/test_hypothesis.py",
    "tests/test_validation.py",
]


@dataclasses.dataclass(frozen=True)
class Mutation:
    bug: str  # what is wrong, in the words of the contract
    backend: str  # whose source it breaks
    path: str  # relative to the repository root
    pattern: str  # a regular expression (re.MULTILINE)
    replacement: str
    count: int = 1  # occurrences that must match; 0: every occurrence (at least one)


MUTATIONS = [
    # --- a wrong tie rule: ties go to the higher index --------------------------------------------
    Mutation(
        "tie rule",
        "reference and groups (_common)",
        "fused_trim/_common.py",
        r"order = torch\.sort\(keys, descending=True, stable=True\)\.indices$",
        "order = keys.shape[0] - 1 - torch.sort(keys.flip(0), descending=True, stable=True).indices",
    ),
    Mutation(
        "tie rule",
        "triton",
        "fused_trim/triton/select.py",
        r"tie_rank = ties_before \+ tl\.cumsum\(tie_i, 0\) - tie_i",
        "tie_rank = ties_before + tl.sum(tie_i, 0) - tl.cumsum(tie_i, 0)",
    ),
    Mutation(
        "tie rule",
        "native",
        "csrc/cpu/select.h",
        r"\(a\.key == b\.key && a\.idx < b\.idx\)",
        "(a.key == b.key && a.idx > b.idx)",
    ),
    # --- k off by one -----------------------------------------------------------------------------
    Mutation(
        "k off by one",
        "reference (_common)",
        "fused_trim/_common.py",
        r"k = torch\.floor\(r \* nf \+ 0\.5\)",
        "k = torch.floor(r * nf + 1.5)",
    ),
    Mutation(
        "k off by one",
        "triton",
        "fused_trim/triton/_radix.py",
        r"k = tl\.floor\(r \* n\.to\(tl\.float64\) \+ 0\.5\)",
        "k = tl.floor(r * n.to(tl.float64) + 1.5)",
    ),
    Mutation(
        "k off by one",
        "native",
        "csrc/trimmed_ce_common.h",
        r"double k = floor\(keep_ratio \* static_cast<double>\(n\) \+ 0\.5\);",
        "double k = floor(keep_ratio * static_cast<double>(n) + 1.5);",
    ),
    # --- a dropped bias gradient (LM head) --------------------------------------------------------
    Mutation(
        "dropped bias gradient",
        "reference",
        "fused_trim/reference.py",
        r"(head = linear_weight\.to\(acc\)\n    )bias = None if linear_bias is None else linear_bias\.to\(acc\)",
        r"\1bias = None if linear_bias is None else linear_bias.detach().to(acc)",
    ),
    Mutation(
        "dropped bias gradient",
        "triton",
        "fused_trim/triton/linear_ce.py",
        r"self\.d_bias \+= dlogits\.sum\(0, dtype=self\.acc\)",
        "self.d_bias += 0",
    ),
    Mutation(
        "dropped bias gradient",
        "native",
        "csrc/linear_ce_cpu.cpp",
        r"need_bias \? finish_grad\(db,",
        "need_bias ? finish_grad(db.zero_(),",
    ),
    # --- a missed ignore_index: ignored samples count as valid in the selection ----------------------
    Mutation(
        "missed ignore_index",
        "reference",
        "fused_trim/reference.py",
        r"^(    input = as_rows\(input\)\n    valid = )target != ignore_index",
        r"\1target == target",
    ),
    Mutation(
        "missed ignore_index",
        "triton",
        "fused_trim/triton/_radix.py",
        r"valid = in_range & \(tgt != ignore_index\)",
        "valid = in_range",
        count=0,
    ),
    Mutation("missed ignore_index", "native", "csrc/cpu/select.h", r"t\[i\] != ignore_index", "true", count=0),
    # --- a wrong label-smoothing term -------------------------------------------------------------
    Mutation(
        "smoothing term",
        "reference",
        "fused_trim/reference.py",
        r"\(label_smoothing / num_classes\) \* smooth",
        "(label_smoothing / (num_classes + 1)) * smooth",
    ),
    Mutation(
        "smoothing term",
        "triton",
        "fused_trim/triton/_ce.py",
        r"\(eps / num_classes\) \* \(d \+ sum_w \* log_s\)",
        "(eps / (num_classes + 1)) * (d + sum_w * log_s)",
    ),
    Mutation(
        "smoothing term",
        "native",
        "csrc/cpu/ce_rows.h",
        r"\(ls / static_cast<acc_t>\(C\)\) \* smooth_term",
        "(ls / static_cast<acc_t>(C + 1)) * smooth_term",
        count=2,  # the scalar finish_sample and its vector form
    ),
    # --- logit_softcap / z_loss: the cap's derivative, the z term's gradient -----------------------
    Mutation(
        "soft-cap derivative dropped",
        "triton",
        "fused_trim/triton/ce_backward.py",
        r"^(\s+)grad \*= dcap$",
        r"\1grad *= 1.0",
    ),
    Mutation(
        "z term missing from the gradient",
        "triton",
        "fused_trim/triton/_ce.py",
        r"p_coef \+= 2\.0 \* z_loss \* \(m \+ log_s\)",
        "p_coef += 0.0 * z_loss * (m + log_s)",
    ),
    Mutation(
        "soft-cap derivative dropped",
        "native",
        "csrc/cpu/ce_rows.h",
        r"return Vectorized<acc_t>\(acc_t\(1\)\) - t \* t;",
        "return Vectorized<acc_t>(acc_t(1)) + acc_t(0) * t;",
    ),
    Mutation(
        "z term missing from the gradient",
        "native",
        "csrc/cpu/ce_rows.h",
        r"g\.a \+= coef \* \(acc_t\(2\) \* zl \* lse\);",
        "g.a += coef * (acc_t(0) * zl * lse);",
    ),
    # --- a non-zero gradient outside K ------------------------------------------------------------
    Mutation(
        "gradient outside K",
        "reference",
        "fused_trim/reference.py",
        r"x = torch\.where\(mask\[:, None\], input\[rows\], 0\)$",
        "x = torch.where(mask[:, None], input[rows], 0) + 1e-3 * (input.sum() - input.detach().sum())",
    ),
    Mutation(
        "gradient outside K",
        "triton",
        "fused_trim/triton/ce_backward.py",
        r"kept = tl\.load\(kept_ptr \+ row\) != 0",
        "kept = (tl.load(kept_ptr + row) != 0) | (row >= 0)",
    ),
    Mutation("gradient outside K", "native", "csrc/cpu/select.h", r"^(\s+)rs\[i\] = 0;", r"\1rs[i] = scale;"),
    # --- a reversed "easiest" rule: it keeps the largest losses -------------------------------------
    Mutation(
        "easiest reversed",
        "reference (_common)",
        "fused_trim/_common.py",
        r"return -1 - key if keep == Keep\.EASIEST else key",
        "return key",
    ),
    Mutation(
        "easiest reversed",
        "triton",
        "fused_trim/triton/_radix.py",
        r"if EASIEST:\n(\s+)key = -1 - key",
        r"if False:\n\1key = -1 - key",
    ),
    Mutation(
        "easiest reversed",
        "native",
        "csrc/trimmed_ce_common.h",
        r"return easiest \? ~key : key;",
        "return key;",
        count=0,
    ),
    # --- a wrong NaN rank: NaN ranked below -inf instead of above +inf -------------------------------
    Mutation(
        "NaN rank",
        "reference (_common)",
        "fused_trim/_common.py",
        r"torch\.full_like\(key, INT64_MAX\), key\)",
        "torch.full_like(key, -INT64_MAX), key)",
    ),
    Mutation(
        "NaN rank",
        "triton",
        "fused_trim/triton/_radix.py",
        r"key = tl\.where\(loss != loss, (0x7FFFFFFF(?:FFFFFFFF)?), key\)",
        r"key = tl.where(loss != loss, -\1, key)",
        count=2,
    ),
    Mutation("NaN rank", "native", "csrc/trimmed_ce_common.h", r"key = 0xFFFFFFFFu;", "key = 0u;"),
    # --- the threshold rule: a sample at the threshold kept (not strictly past it) -----------------
    Mutation(
        "threshold not strict",
        "reference (_common)",
        "fused_trim/_common.py",
        r"past = s < t if keep == Keep\.EASIEST else \(s > t\)",
        "past = s <= t if keep == Keep.EASIEST else (s >= t)",
    ),
    Mutation(
        "threshold not strict",
        "native",
        "csrc/trimmed_ce_common.h",
        r"return easiest \? s < threshold : s > threshold;",
        "return easiest ? s <= threshold : s >= threshold;",
    ),
    # --- groups: a group scored by its sum under "mean" (their tie rule is the shared select's) -------
    Mutation(
        "group mean as sum",
        "groups (_groups)",
        "fused_trim/_groups.py",
        r'if group_reduction == "mean":',
        'if group_reduction != "mean":',
    ),
    # --- min_kept ignored -----------------------------------------------------------------------------
    Mutation(
        "min_kept ignored",
        "reference (_common)",
        "fused_trim/_common.py",
        r"n\.clamp\(max=int\(opts\.min_kept\)\)",
        "n.clamp(max=0)",
    ),
    Mutation(
        "min_kept ignored",
        "native",
        "csrc/trimmed_ce_common.h",
        r"return past > least \? past : least;",
        "return past;",
    ),
]


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def _copy_tree(dest: Path) -> None:
    for rel in _tracked_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def _apply(m: Mutation, tree: Path) -> str | None:
    """Plant ``m`` in ``tree``; the reason it cannot, or ``None``."""
    path = tree / m.path
    if not path.exists():
        return f"{m.path} does not exist"
    text = path.read_text()
    new, n = re.subn(m.pattern, m.replacement, text, flags=re.MULTILINE)
    if n == 0 or (m.count and n != m.count):
        return f"pattern matched {n} times in {m.path} (expected {m.count or 'at least 1'})"
    path.write_text(new)
    return None


def _test_files(tree: Path) -> list[str]:
    rest = sorted(p.relative_to(tree).as_posix() for p in (tree / "tests").glob("test_*.py"))
    first = [f for f in FIRST if (tree / f).exists()]
    return first + [f for f in rest if f not in first]


def _first_failure(output: str) -> str | None:
    for line in output.splitlines():
        match = re.match(r"(?:FAILED|ERROR) (\S+)", line)
        if match:
            return match.group(1)
    return None


def run_one(m: Mutation, scratch: Path, timeout: float) -> tuple[str, str, float]:
    """``(status, detail, seconds)`` with status ``caught``, ``SURVIVED`` or ``ERROR``."""
    start = time.monotonic()
    tree = Path(tempfile.mkdtemp(prefix="mut-", dir=scratch))
    try:
        _copy_tree(tree)
        problem = _apply(m, tree)
        if problem:
            return "ERROR", f"does not apply: {problem}", time.monotonic() - start
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        if m.path.startswith("csrc/"):
            # A private cache: the mutated library must neither reuse nor pollute the real one.
            env["FUSED_TRIM_CACHE_DIR"] = str(tree / ".native-cache")
            build = subprocess.run(
                [sys.executable, "-c", "from fused_trim import _build; _build.build()"],
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if build.returncode != 0:
                return "ERROR", "does not compile: " + build.stderr.strip()[-300:], time.monotonic() - start
        # Two stages: the likely catchers alone first (collecting every file costs seconds too).
        files = _test_files(tree)
        first = [f for f in files if f in FIRST]
        for stage in (first, [f for f in files if f not in first]):
            if not stage:
                continue
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *_xdist_off(), *stage]
            try:
                proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return "ERROR", f"timed out after {timeout:.0f} s", time.monotonic() - start
            output = proc.stdout + proc.stderr
            if proc.returncode == 0:
                continue
            failed = _first_failure(output)
            if failed is None:
                return "ERROR", f"pytest exited {proc.returncode}: {output.strip()[-300:]}", time.monotonic() - start
            return "caught", failed, time.monotonic() - start
        return "SURVIVED", "", time.monotonic() - start
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _xdist_off() -> list[str]:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", "0"]  # one process: "the first failing test" is then well defined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run the mutations whose bug or backend contains this text (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and check that each applies")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutation (default 1800)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in f"{m.bug} {m.backend}" for s in args.only)]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="fused-trim-mutations-") as tmp:
        scratch = Path(tmp)
        if args.list:
            for m in chosen:
                text = (ROOT / m.path).read_text() if (ROOT / m.path).exists() else ""
                n = len(re.findall(m.pattern, text, flags=re.MULTILINE))
                ok = n > 0 and (not m.count or n == m.count)
                failures += not ok
                print(f"{'ok ' if ok else 'BAD'} {m.bug:<22} {m.backend:<20} {m.path} ({n} match)")
            return 1 if failures else 0
        print("| bug | backend | result | first failing test | s |\n|---|---|---|---|---|", flush=True)
        for m in chosen:
            status, detail, seconds = run_one(m, scratch, args.timeout)
            failures += status != "caught"
            print(f"| {m.bug} | {m.backend} | {status} | {detail} | {seconds:.0f} |", flush=True)
    print(f"\n{len(chosen) - failures}/{len(chosen)} mutations caught", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Does trimming help a language model? The LM task of the demo (``python -m fused_trim demo --task lm``).

A tiny ``LlamaForCausalLM`` (built from a config, dropout 0) learns the Python standard library's source
(see ``lm_data``) with its LM head fused into ``trimmed_linear_cross_entropy`` (the ``(N, V)`` logits of
training are never formed). Arms, all paired per seed (the same initial weights, batches and learning
rate schedule, and in the noisy setting the same corrupted sequences):

- ``baseline``: plain cross-entropy over every token;
- ``token-hardest``: mini-batch trimming over tokens, the MBT linear schedule 1.0 -> ``--keep-end``
  (default 0.2) over the steps;
- ``token-easiest``: the lowest-loss tokens, 1.0 -> ``1 - noise`` (0.8 without noise), against noise;
- ``rho1``: Rho-1's selective language modelling: a reference model (same architecture) is trained first
  on the clean reference modules (about a tenth of the training modules), and the main model keeps the
  ``--rho1-keep`` (0.6) fraction of tokens with the highest excess loss ``l - l_ref``
  (``score_offset`` = the reference's per-token losses);
- ``sequence-hardest``: mini-batch trimming per sequence: whole sequences ranked by their mean token
  loss (``group_ids``, one group per sequence), the schedule of ``token-hardest``;
- ``sequence-easiest``: loss truncation (Kang & Hashimoto, 2020): the lowest-loss whole sequences,
  the schedule of ``token-easiest``.

``--noise p`` shuffles the tokens of a fraction ``p`` of the training sequences (the same sequences in
every arm of a seed); validation is always on the clean validation modules. The metric is validation
loss in nats per token (and perplexity); the table gives per-seed paired differences to the baseline,
their Student-t 95% interval and a verdict, as the classifier task does.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from ..functional import resolve_backend, trimmed_linear_cross_entropy
from ..schedules import ConstantSchedule, KeepRatioSchedule, LinearStepSchedule
from .config import TASKS
from .lm_data import LMData, corrupt_sequences, load_lm_data
from .report import write_csv
from .runner import _check_out
from .stats import _mean_std, t_interval, verdict
from .training import lr_factor

__all__ = ["LMConfig", "LM_ARMS", "run_lm_demo", "train_lm_run", "build_lm"]

LM_ARMS = ("baseline", "token-hardest", "token-easiest", "sequence-hardest", "sequence-easiest", "rho1")
SEQUENCE_ARMS = ("sequence-hardest", "sequence-easiest")
EASIEST_ARMS = ("token-easiest", "sequence-easiest")
LM_CSV_FIELDS = (
    "arm",
    "seed",
    "step",
    "tokens",
    "lr",
    "keep_ratio",
    "kept_fraction",
    "objective",
    "train_loss",
    "val_loss",
    "val_ppl",
    "noisy_in_batch",
    "noisy_in_kept",
    "time_s",
)


@dataclass
class LMConfig:
    """Everything that decides an LM demo run; the defaults are the default job (about 5 minutes of
    training on one quiet CPU core)."""

    task: str = "lm"  # what fused_trim.demo.run_demo dispatches on
    seeds: int = 3
    first_seed: int = 0
    steps: int = 120
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 4096
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup_steps: int | None = None  # None: a tenth of the steps
    compare: tuple[str, ...] = ()  # empty: baseline, token-hardest (token-easiest with noise), rho1
    keep_end: float | None = None  # None: 0.2 for the hardest arms; 1 - noise (or 0.8) for the easiest
    rho1_keep: float = 0.6
    reference_steps: int | None = None  # None: half of the steps
    noise: float = 0.0
    eval_every: int | None = None  # None: a fifth of the steps
    val_sequences: int = 128
    stdlib: Path | None = None  # None: this interpreter's standard library
    out: Path = field(default_factory=lambda: Path("demo_lm_out"))
    overwrite: bool = False
    threads: int = 1
    progress: bool = True

    def arms(self) -> tuple[str, ...]:
        """The arms in training order; the baseline always comes first."""
        if self.compare:
            return ("baseline", *(a for a in self.compare if a != "baseline"))
        return ("baseline", "token-easiest" if self.noise > 0 else "token-hardest", "rho1")

    def resolved_warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

    def resolved_reference_steps(self) -> int:
        return max(1, self.steps // 2) if self.reference_steps is None else self.reference_steps

    def resolved_eval_every(self) -> int:
        return max(1, self.steps // 5) if self.eval_every is None else self.eval_every

    def keep_end_for(self, arm: str) -> float:
        if self.keep_end is not None:
            return self.keep_end
        if arm in ("token-hardest", "sequence-hardest"):
            return 0.2
        return 1.0 - self.noise if self.noise > 0 else 0.8

    def validate(self) -> None:
        """Raise ``ValueError`` naming the command-line flag of any inconsistent setting."""
        unknown = [a for a in self.compare if a not in LM_ARMS]
        if unknown:
            raise ValueError(f"--compare takes arms from {LM_ARMS}, got {','.join(self.compare)!r}")
        checks = [
            (len(set(self.compare)) == len(self.compare), f"--compare lists an arm twice: {self.compare}"),
            (self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (
                self.d_model >= 1 and self.heads >= 1,
                f"--d-model and --heads must be >= 1, got {self.d_model}, {self.heads}",
            ),
            (
                self.d_model % self.heads == 0,
                f"--d-model ({self.d_model}) must be a multiple of --heads ({self.heads})",
            ),
            (
                (self.d_model // self.heads) % 2 == 0,
                f"--d-model / --heads must be even (rotary), got {self.d_model // self.heads}",
            ),
            (self.layers >= 1, f"--layers must be >= 1, got {self.layers}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.resolved_warmup() >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.keep_end is None or 0.0 < self.keep_end <= 1.0, f"--keep-end must be in (0, 1], got {self.keep_end}"),
            (0.0 < self.rho1_keep <= 1.0, f"--rho1-keep must be in (0, 1], got {self.rho1_keep}"),
            (self.resolved_reference_steps() >= 1, f"--reference-steps must be >= 1, got {self.reference_steps}"),
            (0.0 <= self.noise < 1.0, f"--noise must be in [0, 1), got {self.noise}"),
            (self.resolved_eval_every() >= 1, f"--eval-every must be >= 1, got {self.eval_every}"),
            (self.val_sequences >= 1, f"--val-sequences must be >= 1, got {self.val_sequences}"),
            (self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def schedule(self, arm: str) -> KeepRatioSchedule:
        """The keep-ratio schedule of ``arm``, called with ``(0, step)``."""
        if arm == "baseline":
            return ConstantSchedule(1.0)
        if arm == "rho1":
            return ConstantSchedule(self.rho1_keep)
        return LinearStepSchedule(1, self.steps, 1.0, self.keep_end_for(arm))


# ---------------------------------------------------------------------------------------------- model


def build_lm(cfg: LMConfig, vocab_size: int):
    """A tiny ``LlamaForCausalLM`` from a config (no weights are downloaded), dropout 0, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=3 * cfg.d_model,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def _head_losses(model, sequences: Tensor, keep_ratio: float = 1.0, **kwargs: Any):
    """``trimmed_linear_cross_entropy`` of next-token prediction on ``sequences`` ``(B, T + 1)``: the
    backbone's hidden states go straight into the fused head, so no ``(B T, V)`` logits exist."""
    hidden = model.model(input_ids=sequences[:, :-1]).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return trimmed_linear_cross_entropy(
        hidden, model.lm_head.weight, sequences[:, 1:].reshape(-1), keep_ratio, linear_bias=model.lm_head.bias, **kwargs
    )


@torch.no_grad()
def evaluate(model, sequences: Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss (nats per token) over ``sequences``, every token counted once."""
    model.eval()
    total = sum(float(_head_losses(model, chunk, reduction="sum")) for chunk in sequences.split(batch_size))
    model.train()
    return total / (sequences.shape[0] * (sequences.shape[1] - 1))


def _val_subset(data: LMData, count: int) -> Tensor:
    """``count`` validation sequences spread evenly over the validation modules (all when fewer)."""
    n = data.validation.shape[0]
    if count >= n:
        return data.validation
    return data.validation[torch.linspace(0, n - 1, count).round().long()]


def _lr_at(cfg: LMConfig, step: int, total: int) -> float:
    """Linear warm-up over the first tenth (``--warmup-steps``), then the classifier's cosine decay."""
    warmup = min(cfg.resolved_warmup(), total)
    ramp = (step + 1) / warmup if step < warmup else 1.0
    return cfg.lr * ramp * lr_factor("cosine", step, total)


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """Indices of ``steps`` mini-batches: epochs over ``count`` sequences, each in a fresh random order."""
    order = torch.cat(
        [torch.randperm(count, generator=generator) for _ in range(math.ceil(steps * batch_size / count))]
    )
    return list(order[: steps * batch_size].view(steps, batch_size))


def train_reference(data: LMData, cfg: LMConfig, seed: int, bar: Any | None = None):
    """Rho-1's reference model: the same architecture trained with plain cross-entropy on the clean
    reference modules for ``--reference-steps`` steps (its own learning-rate schedule)."""
    torch.manual_seed(seed)
    model = build_lm(cfg, data.vocab_size)
    steps = cfg.resolved_reference_steps()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    batches = _batches(data.reference.shape[0], cfg.batch_size, steps, torch.Generator().manual_seed(30_000 + seed))
    for step, index in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step, steps)
        loss = _head_losses(model, data.reference[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if bar is not None:
            bar.update(1)
    model.eval()
    return model


def train_lm_run(
    data: LMData,
    cfg: LMConfig,
    arm: str,
    seed: int,
    reference: Any | None = None,
    bar: Any | None = None,
) -> list[dict[str, object]]:
    """Train one arm with one seed; returns one row (``LM_CSV_FIELDS``) per evaluation, after steps
    ``eval_every, 2 eval_every, ..., steps``. ``rho1`` needs the seed's ``reference`` model."""
    if arm == "rho1" and reference is None:
        raise ValueError("the rho1 arm needs its reference model (train_reference)")
    train, noisy = data.train, torch.zeros(data.train.shape[0], dtype=torch.bool)
    if cfg.noise > 0:
        train, noisy = corrupt_sequences(data.train, cfg.noise, seed)
    validation = _val_subset(data, cfg.val_sequences)
    schedule = cfg.schedule(arm)
    keep = "easiest" if arm in EASIEST_ARMS else "hardest"
    # The sequence arms rank whole sequences: one group id per sequence of the batch.
    groups = torch.arange(cfg.batch_size).repeat_interleave(cfg.seq_len) if arm in SEQUENCE_ARMS else None
    torch.manual_seed(seed)  # the same initial weights in every arm
    model = build_lm(cfg, data.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    batches = _batches(train.shape[0], cfg.batch_size, cfg.steps, torch.Generator().manual_seed(seed))
    every, tokens_per_step = cfg.resolved_eval_every(), cfg.batch_size * cfg.seq_len
    rows: list[dict[str, object]] = []
    sums = dict.fromkeys(("keep", "kept", "objective", "loss", "noisy", "noisy_kept"), 0.0)
    t0, since = time.perf_counter(), 0
    for step, index in enumerate(batches):
        lr = _lr_at(cfg, step, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train[index]
        ratio = schedule(0, step)
        offset = None
        if arm == "rho1":
            with torch.no_grad():
                offset = _head_losses(reference, batch, reduction="none")
        ids = None if groups is None else groups[: batch.shape[0] * cfg.seq_len]
        loss, info = _head_losses(model, batch, ratio, keep=keep, score_offset=offset, group_ids=ids, return_info=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        noisy_tokens = noisy[index].repeat_interleave(cfg.seq_len)
        kept = info.kept.reshape(-1)
        sums["keep"] += ratio
        sums["kept"] += float(kept.float().mean())
        sums["objective"] += float(loss.detach())
        sums["loss"] += float(info.losses.float().mean())
        sums["noisy"] += float(noisy_tokens.float().mean())
        sums["noisy_kept"] += float(noisy_tokens[kept].float().mean())
        since += 1
        if bar is not None:
            bar.update(1)
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            val = evaluate(model, validation)
            mean = {k: v / since for k, v in sums.items()}
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "step": step + 1,
                    "tokens": (step + 1) * tokens_per_step,
                    "lr": lr,
                    "keep_ratio": mean["keep"],
                    "kept_fraction": mean["kept"],
                    "objective": mean["objective"],
                    "train_loss": mean["loss"],
                    "val_loss": val,
                    "val_ppl": math.exp(val),
                    "noisy_in_batch": mean["noisy"],
                    "noisy_in_kept": mean["noisy_kept"],
                    "time_s": time.perf_counter() - t0,
                }
            )
            sums = dict.fromkeys(sums, 0.0)
            since = 0
    return rows


# ------------------------------------------------------------------------------------------- report


def summarize_lm(rows: list[dict[str, object]], cfg: LMConfig) -> dict[str, Any]:
    """Final validation loss per arm and seed, and per arm the paired differences to the baseline
    (nats per token) with their 95% t interval and verdict."""
    arms, seeds = cfg.arms(), sorted({int(r["seed"]) for r in rows})
    final = {
        a: [
            float(r["val_loss"])
            for s in seeds
            for r in rows
            if r["arm"] == a and r["seed"] == s and r["step"] == cfg.steps
        ]
        for a in arms
    }
    paired = {}
    for arm in arms[1:]:
        diff = [t - b for t, b in zip(final[arm], final["baseline"], strict=True)]
        interval = t_interval(diff)
        paired[arm] = {
            "per_seed": diff,
            "diff": _mean_std(diff),
            "ci": interval,
            "wins": sum(d < 0 for d in diff),
            "verdict": verdict(interval, unit="nats/token", digits=4),
        }
    return {"seeds": seeds, "final": final, "stats": {a: _mean_std(v) for a, v in final.items()}, "paired": paired}


def format_lm_table(summary: dict[str, Any], cfg: LMConfig, data: LMData) -> str:
    n = len(summary["seeds"])
    noise = f", noise {cfg.noise:g} (token-shuffled training sequences)" if cfg.noise else ", clean training data"
    lines = [
        data.describe(),
        f"LlamaForCausalLM d={cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads; {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens, AdamW lr {cfg.lr:g} (warm-up {cfg.resolved_warmup()}, cosine)"
        f"{noise}; {n} seed(s); backend {summary.get('backend', 'auto')!r}",
    ]
    for arm in cfg.arms()[1:]:
        lines.append(f"  {arm}: {summary['schedules'][arm]}")
    if "reference_val" in summary:
        ref = ", ".join(f"{v:.3f}" for v in summary["reference_val"])
        lines.append(
            f"  rho1 reference: {cfg.resolved_reference_steps()} steps on the reference modules; val loss {ref}"
        )
    w = max(30, *(len(f"{a} - baseline") + 2 for a in cfg.arms()))
    lines += ["", f"{'validation loss (nats/token)':<{w}}{'final':>16}{'perplexity':>14}"]
    for arm, (mean, std) in summary["stats"].items():
        spread = "n/a" if std is None else f"{std:.4f}"
        lines.append(f"{arm:<{w}}{f'{mean:.4f} ± {spread}':>16}{math.exp(mean):>14.2f}")
    df = f"{n - 1} df" if n > 1 else "one seed"
    for arm, p in summary["paired"].items():
        mean, std = p["diff"]
        wins = f"{p['wins']} / {n}"
        ci = "n/a" if p["ci"] is None else f"{p['ci'][0]:+.4f} … {p['ci'][1]:+.4f}"
        lines += [
            "",
            f"{f'{arm} - baseline':<{w}}{f'{mean:+.4f} ± ' + ('n/a' if std is None else f'{std:.4f}'):>16}",
            f"{f'  95% CI (Student t, {df})':<{w}}{ci:>16}",
            f"{'  seeds where it is better':<{w}}{wins:>16}",
            "  per seed: " + ", ".join(f"{s}: {d:+.4f}" for s, d in zip(summary["seeds"], p["per_seed"], strict=True)),
            f"  verdict: {p['verdict']}",
        ]
    lines += ["", "(mean ± std over seeds; differences in nats/token, negative = the arm helps)"]
    return "\n".join(line.rstrip() for line in lines)


def plot_lm(rows: list[dict[str, object]], cfg: LMConfig, path: Path | None = None) -> Any:
    """Validation loss over steps (mean over seeds, band min-max) and the keep ratio, per arm."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_keep = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colors = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown")
    for i, arm in enumerate(cfg.arms()):
        seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
        steps = [r["step"] for r in rows if r["arm"] == arm and r["seed"] == seeds[0]]
        for column, ax in (("val_loss", ax_loss), ("keep_ratio", ax_keep)):
            curves = np.array([[float(r[column]) for r in rows if r["arm"] == arm and r["seed"] == s] for s in seeds])
            ax.plot(
                steps, curves.mean(0), color=colors[i % len(colors)], marker=".", label=f"{arm} ({len(seeds)} seeds)"
            )
            if len(seeds) > 1:
                ax.fill_between(steps, curves.min(0), curves.max(0), color=colors[i % len(colors)], alpha=0.2, lw=0)
    noise = f", noise {cfg.noise:g}" if cfg.noise else ""
    ax_loss.set(xlabel="step", ylabel="validation loss (nats/token)", title=f"stdlib LM{noise}: clean validation loss")
    ax_keep.set(xlabel="step", ylabel="keep ratio (mean since last eval)", title="kept fraction of tokens")
    ax_keep.set_ylim(0, 1.05)
    for ax in (ax_loss, ax_keep):
        ax.grid(alpha=0.3)
        ax.legend()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def run_lm_demo(cfg: LMConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run every arm over ``cfg.seeds`` seeds, print the table and write ``metrics.csv``,
    ``val_loss.png`` and ``summary.txt`` into ``cfg.out``."""
    cfg.validate()
    out = _check_out(cfg)
    stream = sys.stdout if stream is None else stream
    t_data = time.perf_counter()
    data = load_lm_data(cfg.vocab_size, cfg.seq_len, cfg.stdlib)
    t_data = time.perf_counter() - t_data
    arms = cfg.arms()
    schedules = {a: repr(cfg.schedule(a)) + (", keep='easiest'" if a in EASIEST_ARMS else "") for a in arms}
    for a in arms:
        if a in SEQUENCE_ARMS:
            schedules[a] += ", whole sequences (group_ids)"
    if "rho1" in arms:
        schedules["rho1"] += ", score_offset = the reference model's per-token losses"
    backend = resolve_backend("auto", torch.device("cpu"))  # compiles the native op before the clock
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        per_seed = len(arms) * cfg.steps + ("rho1" in arms) * cfg.resolved_reference_steps()
        bar = tqdm(total=per_seed * len(seeds), unit="step", desc="stdlib LM", dynamic_ncols=True, disable=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    rows: list[dict[str, object]] = []
    reference_val: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for seed in seeds:
            reference = None
            if "rho1" in arms:
                reference = train_reference(data, cfg, seed, bar)
                reference_val.append(evaluate(reference, _val_subset(data, cfg.val_sequences)))
            for arm in arms:
                rows += train_lm_run(data, cfg, arm, seed, reference, bar)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = summarize_lm(rows, cfg)
    summary.update(backend=backend, schedules=schedules)
    if reference_val:
        summary["reference_val"] = reference_val
    table = format_lm_table(summary, cfg, data)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "metrics.csv", "png": out / "val_loss.png", "txt": out / "summary.txt"}
    write_csv(rows, paths["csv"], LM_CSV_FIELDS)
    plot_lm(rows, cfg, paths["png"])
    config = asdict(cfg)
    config.pop("progress")
    config["compare"] = ",".join(arms)
    text = (
        f"{table}\n\ntraining wall time {wall:.1f} s, CPU time {cpu:.1f} s "
        f"(data and tokenizer {t_data:.1f} s before it)\n"
        f"config: {', '.join(f'{k}={v}' for k, v in config.items())}\n"
    )
    paths["txt"].write_text(text, encoding="utf-8")
    print(table, file=stream)
    print(
        f"\ntraining took {wall:.1f} s (CPU {cpu:.1f} s); wrote {paths['csv']}, {paths['png']}, {paths['txt']}",
        file=stream,
    )
    return {"rows": rows, "summary": summary, "table": table, "wall_s": wall, "cpu_s": cpu, **paths}


# ------------------------------------------------------------------------------------------- flags


def _arm_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in LM_ARMS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"arms are a comma-separated list from {', '.join(LM_ARMS)}: {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``--task lm``."""
    d = LMConfig()
    a = parser.add_argument
    a("--task", choices=TASKS, default=d.task, help="what is trained (classifier: see --task classifier --help)")
    a("--seeds", type=int, default=d.seeds, help="number of seeds per arm (default %(default)s)")
    a("--first-seed", type=int, default=d.first_seed, help="seeds are first-seed, first-seed+1, ...")
    a(
        "--compare",
        type=_arm_list,
        default=(),
        metavar="A1,A2,...",
        help=f"arms against the baseline, from {', '.join(LM_ARMS[1:])} (default: token-hardest,rho1; "
        "with --noise: token-easiest,rho1)",
    )
    a("--noise", type=float, default=d.noise, help="fraction of training sequences whose tokens are shuffled")
    a("--steps", type=int, default=d.steps, help="optimizer steps per arm (default %(default)s)")
    a("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    a("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default %(default)s)")
    a("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary (default %(default)s)")
    a("--d-model", type=int, default=d.d_model, help="model width (default %(default)s)")
    a("--layers", type=int, default=d.layers, help="transformer layers (default %(default)s)")
    a("--heads", type=int, default=d.heads, help="attention heads (default %(default)s)")
    a("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default %(default)s)")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default steps/10)")
    a(
        "--keep-end",
        type=float,
        default=None,
        help="last keep ratio of the token and sequence arms (0.2; easiest: 1 - noise or 0.8)",
    )
    a("--rho1-keep", type=float, default=d.rho1_keep, help="kept fraction of the rho1 arm (default %(default)s)")
    a("--reference-steps", type=int, default=None, help="steps of rho1's reference model (default steps/2)")
    a("--eval-every", type=int, default=None, help="steps between validation evaluations (default steps/5)")
    a("--val-sequences", type=int, default=d.val_sequences, help="validation sequences evaluated (default %(default)s)")
    a("--stdlib", type=Path, default=None, help="standard-library folder to read (default: this Python's)")
    a("--out", type=Path, default=d.out, help="output folder, empty or new (default %(default)s)")
    a("--overwrite", action="store_true", help="replace the files of a non-empty --out folder")
    a("--threads", type=int, default=d.threads, help="torch intra-op threads (default %(default)s)")
    a("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def config_from_args(args: argparse.Namespace) -> LMConfig:
    """An :class:`LMConfig` from parsed command-line flags."""
    names = [f.name for f in fields(LMConfig) if f.name != "progress"]
    return LMConfig(**{name: getattr(args, name) for name in names}, progress=not args.no_progress)

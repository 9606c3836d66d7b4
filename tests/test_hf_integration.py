"""The Hugging Face transformers integration against the unpatched models, built from tiny configs."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fused_trim import trimmed_cross_entropy, trimmed_linear_cross_entropy  # noqa: E402
from fused_trim.integrations.transformers import (  # noqa: E402
    TrimScheduleCallback,
    apply_fused_trim,
    get_trim_state,
    remove_fused_trim,
    sequence_group_ids,
    trimmed_loss_func,
)
from fused_trim.schedules import LinearSchedule  # noqa: E402

VOCAB = 97
HAS_GROUP_IDS = "group_ids" in inspect.signature(trimmed_linear_cross_entropy).parameters


def tiny(kind: str, vocab: int = VOCAB, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **heads, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **heads, tie_word_embeddings=False))
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, **heads, head_dim=8, final_logit_softcapping=30.0)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.float().train()


def batch(b: int = 2, t: int = 13, vocab: int = VOCAB, ignored: float = 0.3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[torch.rand(b, t, generator=g) < ignored] = -100
    return ids, labels


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def pair(kind: str, **patch):
    base = tiny(kind)
    patched = apply_fused_trim(copy.deepcopy(base), **patch)
    return base, patched


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("with_num_items", [False, True])
def test_keep_one_equals_unpatched_loss_and_grads(kind, with_num_items):
    base, patched = pair(kind, keep_ratio=1.0, backend="reference")
    ids, labels = batch()
    extra = {"num_items_in_batch": torch.tensor(40)} if with_num_items else {}
    ref = base(input_ids=ids, labels=labels, **extra)
    out = patched(input_ids=ids, labels=labels, **extra)
    assert out.logits is None and type(out) is type(ref)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base))


def test_keep_one_default_backend_equals_unpatched():
    base, patched = pair("llama", keep_ratio=1.0)
    ids, labels = batch()
    ref, out = base(input_ids=ids, labels=labels), patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("keep", ["hardest", "easiest"])
def test_half_equals_trimmed_ce_of_unpatched_logits(kind, keep):
    base, patched = pair(kind, keep_ratio=0.5, keep=keep, backend="reference")
    ids, labels = batch(seed=3)
    logits = base(input_ids=ids).logits
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB), shifted(labels).reshape(-1), 0.5, keep=keep)
    out = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    upstream = torch.tensor(1.7)  # a non-unit upstream gradient
    (expected * upstream).backward()
    (out.loss * upstream).backward()
    assert_grads_close(grads(patched), grads(base))


def test_shift_labels_given_by_the_caller():
    base, patched = pair("llama", keep_ratio=0.5, backend="reference")
    ids, labels = batch(seed=4)
    target = shifted(labels)
    target[0, :3] = -100  # differs from shifting labels, so the argument must be the one used
    logits = base(input_ids=ids).logits
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), 0.5)
    out = patched(input_ids=ids, labels=labels, shift_labels=target)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def test_gradient_accumulation_with_unequal_valid_counts():
    base, patched = pair("qwen2", keep_ratio=0.5, backend="reference")
    (ids_a, lab_a), (ids_b, lab_b) = batch(seed=5, ignored=0.1), batch(b=1, seed=6, ignored=0.5)
    n_a, n_b = int((shifted(lab_a) != -100).sum()), int((shifted(lab_b) != -100).sum())
    assert n_a != n_b
    total = torch.tensor(n_a + n_b)
    expected = 0
    for ids, lab, n in ((ids_a, lab_a, n_a), (ids_b, lab_b, n_b)):
        logits = base(input_ids=ids).logits
        mean_k = trimmed_cross_entropy(logits.reshape(-1, VOCAB), shifted(lab).reshape(-1), 0.5)
        part = mean_k * n / total
        part.backward()
        expected = expected + part.detach()
    got = 0
    for ids, lab in ((ids_a, lab_a), (ids_b, lab_b)):
        loss = patched(input_ids=ids, labels=lab, num_items_in_batch=total).loss
        loss.backward()
        got = got + loss.detach()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert_grads_close(grads(patched), grads(base))


def test_one_micro_batch_is_the_trimmed_mean_and_an_empty_one_adds_zero():
    base, patched = pair("llama", keep_ratio=0.3, backend="reference")
    ids, labels = batch(seed=7)
    n = (shifted(labels) != -100).sum()
    with_count = patched(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    without = patched(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(with_count, without, atol=1e-6, rtol=1e-6)
    empty = patched(input_ids=ids, labels=torch.full_like(labels, -100), num_items_in_batch=n).loss
    assert empty.item() == 0.0
    empty.backward()
    assert all(p.grad is None or not p.grad.any() for p in patched.parameters())


def test_tied_embeddings_receive_the_head_gradient():
    base, patched = pair("gpt2", keep_ratio=0.5, backend="reference")
    assert patched.lm_head.weight is patched.transformer.wte.weight
    ids, labels = batch(seed=8)
    patched(input_ids=ids, labels=labels).loss.backward()
    # Only the embedding rows of the input tokens get a gradient through the lookup; the head's
    # gradient reaches every row of the vocabulary.
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[ids.unique()] = False
    assert patched.transformer.wte.weight.grad[unused].abs().sum() > 0


def test_frozen_head_gets_no_gradient():
    base, patched = pair("llama", keep_ratio=0.5, backend="reference")
    base.lm_head.weight.requires_grad_(False)
    patched.lm_head.weight.requires_grad_(False)
    ids, labels = batch(seed=9)
    logits = base(input_ids=ids).logits
    trimmed_cross_entropy(logits.reshape(-1, VOCAB), shifted(labels).reshape(-1), 0.5).backward()
    patched(input_ids=ids, labels=labels).loss.backward()
    assert patched.lm_head.weight.grad is None
    assert_grads_close(grads(patched), grads(base))


def test_eval_and_no_labels_run_the_original_forward():
    base, patched = pair("llama", keep_ratio=0.5, backend="reference")
    ids, labels = batch(seed=10)
    no_labels = patched(input_ids=ids)
    torch.testing.assert_close(no_labels.logits, base(input_ids=ids).logits, atol=0, rtol=0)
    base.eval()
    patched.eval()
    got, ref = patched(input_ids=ids, labels=labels), base(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=0, rtol=0)


def test_remove_restores_the_forward_exactly():
    model = tiny("llama")
    before = model.forward
    apply_fused_trim(model, 0.5, backend="reference")
    assert "forward" in model.__dict__
    remove_fused_trim(model)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model.forward == before and model.forward.__func__ is type(model).forward
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None
    with pytest.raises(ValueError, match="not patched"):
        remove_fused_trim(model)


def test_rho1_reference_model_losses_become_the_score_offset():
    base, patched = tiny("llama"), None
    reference = tiny("llama", seed=11)
    patched = apply_fused_trim(copy.deepcopy(base), 0.4, reference_model=reference, backend="reference")
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    ids, labels = batch(seed=12)
    target = shifted(labels).reshape(-1)
    with torch.no_grad():
        ref_losses = F.cross_entropy(reference(input_ids=ids).logits.reshape(-1, VOCAB), target, reduction="none")
    logits = base(input_ids=ids).logits.reshape(-1, VOCAB)
    expected = trimmed_cross_entropy(logits, target, 0.4, score_offset=ref_losses)
    plain = trimmed_cross_entropy(logits, target, 0.4)
    out = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected, plain)  # the offset changed which tokens were kept
    expected.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base))


def test_trimmed_loss_func_matches_the_patch():
    base, patched = pair("llama", keep_ratio=0.5, backend="reference")
    loss_func = trimmed_loss_func(0.5, backend="reference")
    ids, labels = batch(seed=13)
    n = torch.tensor(50)
    for extra in ({}, {"num_items_in_batch": n}):
        got = loss_func(base(input_ids=ids), labels, **extra)
        torch.testing.assert_close(got, patched(input_ids=ids, labels=labels, **extra).loss, atol=1e-6, rtol=1e-6)
    whole = trimmed_loss_func(1.0, backend="reference")(base(input_ids=ids), labels, num_items_in_batch=n)
    torch.testing.assert_close(whole, base(input_ids=ids, labels=labels, num_items_in_batch=n).loss)


def test_sequence_group_ids_follow_rows_and_position_resets():
    rows = sequence_group_ids((2, 3), None, torch.device("cpu"))
    assert rows.tolist() == [[0, 0, 0], [1, 1, 1]]
    pos = torch.tensor([[0, 1, 0, 1, 2], [3, 4, 0, 1, 0]])
    assert sequence_group_ids((2, 5), pos, torch.device("cpu")).tolist() == [[0, 0, 1, 1, 1], [2, 2, 3, 3, 4]]


@pytest.mark.skipif(not HAS_GROUP_IDS, reason="group='sequence' needs the op's group_ids= option, not available yet")
def test_sequence_group_equals_trimmed_ce_of_unpatched_logits():
    base, patched = pair("llama", keep_ratio=0.5, group="sequence", backend="reference")
    ids, labels = batch(b=4, seed=14)
    logits = base(input_ids=ids).logits
    target = shifted(labels)
    groups = sequence_group_ids(target.shape, None, target.device)
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), 0.5, group_ids=groups.reshape(-1))
    out = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    expected.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base))


@pytest.mark.skipif(not HAS_GROUP_IDS, reason="group='sequence' needs the op's group_ids= option, not available yet")
@pytest.mark.parametrize("with_num_items", [False, True])
def test_sequence_group_of_packed_rows_follows_position_ids(with_num_items):
    """Packed rows: documents start where position_ids restart at 0; whole documents are kept."""
    base, patched = pair("llama", keep_ratio=0.5, group="sequence", backend="reference")
    ids, labels = batch(b=3, t=12, seed=21)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]] + [list(range(12))])
    logits = base(input_ids=ids, position_ids=pos).logits
    target = shifted(labels)
    groups = sequence_group_ids(target.shape, pos, target.device)
    assert int(groups.max()) == 5
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), 0.5, group_ids=groups.reshape(-1))
    extra = {"num_items_in_batch": (target != -100).sum()} if with_num_items else {}
    out = patched(input_ids=ids, labels=labels, position_ids=pos, **extra)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    expected.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base))


@pytest.mark.skipif(HAS_GROUP_IDS, reason="the op has group_ids=")
def test_sequence_group_without_group_ids_raises():
    with pytest.raises(NotImplementedError, match="group_ids"):
        apply_fused_trim(tiny("llama"), 0.5, group="sequence")


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_gemma2_softcapping_is_the_unpatched_models(keep_ratio):
    """Gemma 2 soft-caps its logits (final_logit_softcapping=30): the patch passes the cap to the op,
    so keep 1.0 is the model's own loss and gradients, and 0.5 the trimmed loss of its capped logits.
    The hidden states are scaled up so that the cap bends the logits (|z| of order c)."""
    base = tiny("gemma2")
    with torch.no_grad():
        base.lm_head.weight.mul_(400.0)
    patched = apply_fused_trim(copy.deepcopy(base), keep_ratio)
    ids, labels = batch(seed=15)
    logits = base(input_ids=ids).logits
    assert logits.abs().max() > 15.0  # the cap is active: tanh(z / 30) is far from z / 30
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB), shifted(labels).reshape(-1), keep_ratio)
    out = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    if keep_ratio == 1.0:
        torch.testing.assert_close(out.loss, base(input_ids=ids, labels=labels).loss, atol=1e-5, rtol=1e-5)
    expected.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base), atol=1e-4)
    with pytest.raises(ValueError, match="logit_softcap= is set by the integration"):
        apply_fused_trim(tiny("llama"), 0.5, logit_softcap=30.0)


@pytest.mark.parametrize(
    "rule",
    [dict(keep_count=7), dict(keep_threshold=4.5, min_kept=3), dict(keep_threshold=4.5)],
    ids=["count", "threshold-min", "threshold"],
)
def test_keep_rules_equal_trimmed_ce_of_unpatched_logits(rule):
    base, patched = pair("llama", backend="reference", **rule)
    ids, labels = batch(seed=16)
    logits = base(input_ids=ids).logits
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB), shifted(labels).reshape(-1), **rule)
    out = patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    state = get_trim_state(patched)
    stats = state.pop_stats()
    name = next(iter(rule))
    assert stats[name] == rule[name] and state.keep_ratio is None
    expected.backward()
    out.loss.backward()
    assert_grads_close(grads(patched), grads(base))


def test_count_schedule_is_stepped_and_logged():
    from fused_trim.schedules import OrderedSGDSchedule

    model = apply_fused_trim(tiny("llama"), keep_count=OrderedSGDSchedule(start_count=8), backend="reference")
    state = get_trim_state(model)
    assert state.rule == "keep_count" and state.keep_count == 8 and state.set_progress(0, 0) == 8
    state.keep_count = 3
    ids, labels = batch(seed=17)
    loss = model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(loss) and state.pop_stats()["keep_count"] == 3
    with pytest.raises(ValueError, match="keep_ratio cannot be set: this state keeps by keep_count"):
        state.keep_ratio = 0.5
    with pytest.raises(ValueError, match="keep_count must be an int >= 0"):
        state.keep_count = -1


def test_conflicting_keep_rules_raise():
    with pytest.raises(
        ValueError,
        match="exactly one of keep_ratio, keep_count and keep_threshold sets k, got keep_ratio and keep_count",
    ):
        apply_fused_trim(tiny("llama"), 0.5, keep_count=4)
    with pytest.raises(ValueError, match="min_kept is used with keep_threshold only"):
        apply_fused_trim(tiny("llama"), 0.5, min_kept=4)
    with pytest.raises(ValueError, match="keep_threshold"):
        apply_fused_trim(tiny("llama"), keep_threshold=float("nan"))
    with pytest.raises(ValueError, match="exactly one of"):
        trimmed_loss_func(0.5, keep_threshold=1.0)


def test_logit_transform_after_the_head_is_detected():
    model = apply_fused_trim(tiny("llama"), 0.5, backend="reference")
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2.0)
    ids, labels = batch()
    with pytest.raises(RuntimeError, match="transforms its head's logits"):
        model(input_ids=ids, labels=labels)


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="model must be a causal LM with an output embedding"):
        apply_fused_trim(transformers.LlamaModel(tiny("llama").config), 0.5)
    with pytest.raises(ValueError, match="group must be"):
        apply_fused_trim(tiny("llama"), 0.5, group="document")
    with pytest.raises(ValueError, match="reference_model must have the model's vocabulary size 97, got 50"):
        apply_fused_trim(tiny("llama"), 0.5, reference_model=tiny("llama", vocab=50))
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_fused_trim(tiny("llama"), 1.5)
    with pytest.raises(ValueError, match="keep must be"):
        apply_fused_trim(tiny("llama"), 0.5, keep="middle")
    with pytest.raises(ValueError, match="reduction= is set by the integration"):
        apply_fused_trim(tiny("llama"), 0.5, reduction="sum")
    model = apply_fused_trim(tiny("llama"), 0.5)
    with pytest.raises(ValueError, match="already patched"):
        apply_fused_trim(model, 0.5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=batch()[0], labels=batch()[1], logits_to_keep=1)


class _Rows(torch.utils.data.Dataset):
    """Sequences counting up modulo the vocabulary: learnable in a few steps."""

    def __init__(self, n: int, t: int = 16) -> None:
        self.rows = [(torch.arange(t) * 1 + 7 * i) % VOCAB for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def test_trainer_with_gradient_accumulation_and_the_schedule_callback(tmp_path):
    model = apply_fused_trim(tiny("llama"), LinearSchedule(epochs=5, start=1.0, end=0.5), backend="reference")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=20,
        learning_rate=1e-2,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        per_device_eval_batch_size=4,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Rows(16), eval_dataset=_Rows(4), callbacks=[TrimScheduleCallback()]
    )
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch to the patch
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5
    assert logs[0]["keep_ratio"] == 1.0 and logs[-1]["keep_ratio"] == 0.5
    assert all(0 < h["kept_fraction"] <= 1 and "trim_threshold" in h for h in logs)
    assert logs[-1]["kept_fraction"] < 0.6
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"]  # although the kept half are the hardest tokens
    assert get_trim_state(model).keep_ratio == 0.5
    pred = trainer.predict(_Rows(4))
    assert pred.predictions.shape == (4, 16, VOCAB)


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own_parameters():
    model = apply_fused_trim(tiny("llama"), 0.5, backend="reference")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
    ids, labels = batch()
    assert clone(input_ids=ids, labels=labels).loss.item() != model(input_ids=ids, labels=labels).loss.item()
    assert get_trim_state(clone) is not get_trim_state(model)
    remove_fused_trim(clone)
    assert "forward" not in clone.__dict__ and "forward" in model.__dict__


def test_tuple_outputs_carry_the_loss_first():
    base, patched = pair("llama", keep_ratio=1.0, backend="reference")
    ids, labels = batch()
    out = patched(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[1] is None
    torch.testing.assert_close(out[0], base(input_ids=ids, labels=labels).loss, atol=1e-6, rtol=1e-6)


def test_schedule_callback_steps_per_epoch_and_per_step():
    from fused_trim.schedules import LinearStepSchedule

    model = apply_fused_trim(tiny("llama"), LinearSchedule(epochs=3, start=1.0, end=0.5))
    state = transformers.TrainerState()
    seen = []
    for schedule in (None, LinearStepSchedule(epochs=2, steps_per_epoch=2, start=1.0, end=0.4)):
        callback = TrimScheduleCallback(schedule)
        for _ in range(2):
            callback.on_epoch_begin(None, state, None, model=model)
            for _ in range(2):
                callback.on_step_begin(None, state, None, model=model)
                seen.append(get_trim_state(model).keep_ratio)
                callback.on_step_end(None, state, None, model=model)
    assert seen == pytest.approx([1.0, 1.0, 0.75, 0.75, 1.0, 0.8, 0.6, 0.4])
    with pytest.raises(ValueError, match="not patched"):
        TrimScheduleCallback().on_step_begin(None, state, None, model=tiny("llama"))


def test_the_package_imports_without_transformers(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "fused_trim.integrations.transformers")
    importlib.reload(importlib.import_module("fused_trim.integrations"))
    with pytest.raises(ImportError, match=r"fused_trim\[hf\]"):
        importlib.import_module("fused_trim.integrations.transformers")
    monkeypatch.undo()
    assert importlib.import_module("fused_trim.integrations.transformers").apply_fused_trim is apply_fused_trim


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_autocast_head_path_is_the_unpatched_models(keep_ratio):
    """Under bf16 autocast the patched head gets the backbone's hidden states and the fp32
    ``lm_head.weight`` as they are, casts them as the unpatched ``lm_head`` does and returns an
    fp32 loss: the unpatched loss within its bf16 logits' rounding, fp32 gradients."""
    base, patched = pair("llama", keep_ratio=keep_ratio, backend="reference")
    ids, labels = batch(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patched(input_ids=ids, labels=labels)
        logits = base(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    expected = trimmed_cross_entropy(logits.reshape(-1, VOCAB).float(), shifted(labels).reshape(-1), keep_ratio)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected, atol=2e-3, rtol=2e-3)
    out.loss.backward()
    expected.backward()
    head, base_head = patched.get_output_embeddings().weight, base.get_output_embeddings().weight
    assert head.grad.dtype == torch.float32
    torch.testing.assert_close(head.grad, base_head.grad, rtol=3e-2, atol=3e-3)

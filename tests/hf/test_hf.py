"""fastweight.hf against the models' own logits + cross-entropy, on tiny random models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_fixtures import ARCHS, make_model  # noqa: E402

import fastweight.hf as fwhf  # noqa: E402
from fastweight.hf import (causal_lm_loss, find_lm_head, hidden_states, model_hash,  # noqa: E402
                           sample_losses)

VOCAB = 131  # odd, not a multiple of any block size


def _batch(seed=0, B=4, T=19, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 13:] = 0
    mask[3, 7:] = 0
    labels = ids.clone()
    labels[:, :5] = -100          # a prompt
    labels[2, 5:9] = -100          # a masked span inside the response
    labels[mask == 0] = -100
    return ids, labels, mask


def _reference(model, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    out = []
    for i in range(ids.shape[0]):
        tgt = labels[i, 1:]
        valid = tgt != -100
        tok = F.cross_entropy(logits[i, :-1], tgt.clamp_min(0), reduction="none")
        out.append(tok[valid].mean() if valid.any() else torch.zeros((), dtype=torch.float64))
    return torch.stack(out), logits


def _model(arch, **kw):
    # gemma2: a larger head so that final_logit_softcapping (2.5) clearly changes the loss
    return make_model(arch, vocab_size=VOCAB, head_scale=30.0 if arch == "gemma2" else 1.0, **kw)


@pytest.mark.parametrize("arch", ARCHS + ("cohere", "granite"))
def test_sample_losses_match_model_logits(arch):
    model = _model(arch)
    ids, labels, mask = _batch()
    with torch.no_grad():
        ref, logits = _reference(model, ids, labels, mask)
    ours = sample_losses(model, ids, labels, mask)
    assert ours.dtype == torch.float32 and ours.shape == (4,)
    rel = ((ours.double() - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-5, (arch, ours, ref)
    head = find_lm_head(model)
    if arch == "gemma2":
        assert head.softcap == 2.5
        # the softcap really matters here: without it the loss differs
        hs = hidden_states(model, ids, mask)
        raw = F.cross_entropy((hs @ head.weight.T)[0, 4:-1].double(), labels[0, 5:])
        assert abs(raw.item() - ref[0].item()) > 1e-2
    if arch == "cohere":
        assert head.logit_scale == 0.5
    if arch == "granite":
        assert head.logit_scale == 0.25


def test_tied_head_is_the_embedding():
    model = _model("gpt2")
    head = find_lm_head(model)
    assert head.weight is model.get_input_embeddings().weight
    assert head.bias is None and head.softcap is None and head.logit_scale is None


def test_head_bias_is_applied():
    model = _model("llama")
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.normal_(0, 2.0)
    model.lm_head = new
    ids, labels, mask = _batch(1)
    with torch.no_grad():
        ref, _ = _reference(model, ids, labels, mask)
    ours = sample_losses(model, ids, labels, mask)
    assert find_lm_head(model).bias is new.bias
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


def test_packed_equals_padded():
    model = _model("qwen2")
    ids, labels, mask = _batch(2)
    padded = sample_losses(model, ids, labels, mask)
    lens = mask.sum(1).tolist()
    flat_ids = torch.cat([ids[i, :n] for i, n in enumerate(lens)])[None]
    flat_lab = torch.cat([labels[i, :n] for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed = sample_losses(model, flat_ids, flat_lab, cu_seqlens=cu, position_ids=pos)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_causal_lm_loss_and_grads(arch):
    model = _model(arch).train()
    for m in model.modules():  # no dropout: compare exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, labels, mask = _batch(3)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    loss = causal_lm_loss(model, ids, labels, mask, w)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                          reduction="none", ignore_index=-100).view(4, -1)
    n_valid = (labels[:, 1:] != -100).sum()
    ref = (tok.sum(1) * w).sum() / n_valid  # sample_reduction="token", reduction="mean"
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the paper's per-sample mean formula, and num_items
    loss_mean = causal_lm_loss(model, ids, labels, mask, w, sample_reduction="mean", reduction="sum")
    per = sample_losses(model, ids, labels, mask)
    torch.testing.assert_close(loss_mean.detach(), (per * w).sum(), rtol=1e-5, atol=1e-6)
    l2 = causal_lm_loss(model, ids, labels, mask, w, num_items=100)
    torch.testing.assert_close(l2.detach(), ref.detach() * n_valid / 100, rtol=1e-5, atol=1e-6)


def test_unknown_logit_transform_raises():
    model = _model("llama")
    model.config.output_logit_multiplier = 3.0
    with pytest.raises(NotImplementedError, match="output_logit_multiplier"):
        find_lm_head(model)
    model.config.output_logit_multiplier = None  # inert values are fine
    find_lm_head(model)
    # a logit scale under a model type whose semantics fastweight does not know
    model.config.logits_scaling = 2.0
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        find_lm_head(model)


def test_attention_softcap_is_not_a_head_transform():
    head = find_lm_head(_model("gemma2"))
    assert head.softcap == 2.5  # attn_logit_softcapping=50 is ignored, final one applied


def test_non_linear_head_raises():
    model = _model("llama")

    class Weird(torch.nn.Linear):
        pass

    model.lm_head = Weird(48, VOCAB)
    with pytest.raises(NotImplementedError, match="nn.Linear"):
        find_lm_head(model)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(48, VOCAB))
    with pytest.raises(NotImplementedError, match="Sequential"):
        find_lm_head(model)


def test_check_head_catches_hidden_transform():
    model = _model("llama")
    ids, labels, _ = _batch(4)
    assert fwhf.check_head(model, ids[0], labels[0]) < 1e-5
    # an architecture that rescales the logits behind fastweight's back
    orig = model.forward

    def forward(*a, **k):
        out = orig(*a, **k)
        out.logits = out.logits * 3.0
        return out

    model.forward = forward
    with pytest.raises(NotImplementedError, match="differs"):
        fwhf.check_head(model, ids[0], labels[0])


def test_model_hash_ignores_dtype_and_path():
    a = _model("llama")
    b = _model("llama", seed=1)
    assert model_hash(a) == model_hash(b)  # same architecture/config: names and shapes only
    assert model_hash(a) == model_hash(a.to(torch.bfloat16))
    assert model_hash(a) != model_hash(_model("qwen2"))


def test_lazy_trainer_attribute():
    assert "FlowTrainer" in dir(fwhf)
    with pytest.raises(AttributeError):
        fwhf.NoSuchThing  # noqa: B018

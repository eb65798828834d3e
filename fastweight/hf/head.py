"""The LM head of a Hugging Face causal LM, its logit transforms, and losses computed from the
final hidden states without ever building the (N, V) logits.

``find_lm_head`` reads the head module (``get_output_embeddings()``, so tied embeddings come for
free) and the logit transforms of the config. Every config attribute that could change the
logits is either applied or refused: a head that fastweight cannot reproduce raises instead of
producing a silently wrong loss.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LMHead", "HeadInputs", "find_lm_head", "hidden_states", "head_inputs", "causal_lm_loss",
           "sample_losses", "model_hash", "check_head", "is_peft_model", "unwrap_peft"]

# Config attributes whose name looks like a logit transform but which never touch the LM-head
# logits (attention / router internals, output flags, generation settings).
_INERT_ATTRS = frozenset({
    "output_router_logits", "attn_logit_softcapping", "num_logits_to_keep", "logits_to_keep",
    "moe_router_logit_softcapping", "router_logit_softcapping", "conf_attention_logit_cap",
    "attention_logit_cap", "attention_invalid_logits_value", "output_auxiliary_logits",
    "return_logits", "output_logits", "logit_scale_init_value",
})
# Names that look like something applied to the head's output or input.
_SUSPECT = re.compile(r"logit|lm_head|head_multiplier|output_multiplier|output_scale|unpadded_vocab")


@dataclass
class LMHead:
    """The pieces of ``logits = softcap(logit_scale * (hidden @ weight.T + bias))``.

    weight: (V, D) the head's (possibly tied) weight; bias: (V,) or None; softcap: Gemma 2's
    ``final_logit_softcapping`` or None; logit_scale: a multiplier of the logits (Cohere's
    ``logit_scale``, 1 / Granite's ``logits_scaling``) or None.
    """
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    logit_scale: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


def _configs(model) -> list:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `.config`; fastweight.hf needs a "
                         "transformers PreTrainedModel")
    out = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text(decoder=True)
        except TypeError:
            text = get_text()
        if text is not None and text is not config:
            out.append(text)
    return out


def _inert(value) -> bool:
    return value is None or value is False


def _logit_scale(model_type: str, name: str, value: float) -> float | None:
    """The logit multiplier a known (model family, attribute) pair stands for, else None."""
    value = float(value)
    if name == "logit_scale" and model_type.startswith("cohere"):
        return value                                   # logits = lm_head(h) * logit_scale
    if name == "logits_scaling" and (model_type.startswith("granite") or model_type == "minicpm3"):
        return 1.0 / value                             # logits = lm_head(h) / logits_scaling
    if name == "logits_scaling" and model_type.startswith("hyperclovax"):
        return value                                   # logits = lm_head(h) * logits_scaling
    if name == "lm_head_multiplier" and model_type == "falcon_h1":
        return value                                   # logits = lm_head(h) * lm_head_multiplier
    return None


def find_lm_head(model) -> LMHead:
    """The LM head of ``model`` and the logit transforms its config asks for.

    Raises:
        NotImplementedError: the output embedding is not a plain ``nn.Linear`` (or
            ``nn.Embedding`` for a tied head), or the config carries a logit transform that
            fastweight does not know how to apply.
        ValueError: the model has no output embeddings.
    """
    model = unwrap_peft(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings "
                         "(get_output_embeddings() is None): it is not a causal LM with an LM head")
    if type(head) in (nn.Linear, nn.Embedding):
        weight = head.weight
        bias = head.bias if isinstance(head, nn.Linear) else None
    else:
        raise NotImplementedError(
            f"the LM head of {type(model).__name__} is a {type(head).__name__}, not an nn.Linear; "
            "fastweight only handles a linear head (hidden @ W.T + b), so it refuses rather than "
            "compute a wrong loss")
    if weight.dim() != 2:
        raise NotImplementedError(f"LM head weight has shape {tuple(weight.shape)}, expected (V, D)")

    softcap = None
    scale = None
    handled = set()
    for config in _configs(model):
        model_type = str(getattr(config, "model_type", "") or "")
        for name, value in sorted(config.to_dict().items()):
            if not _SUSPECT.search(name) or name in _INERT_ATTRS or name in handled:
                continue
            if isinstance(value, dict) or _inert(value):
                continue
            if name == "final_logit_softcapping":
                softcap = float(value)
                if not softcap > 0:
                    raise ValueError(f"config.final_logit_softcapping={value!r} must be positive or None")
                handled.add(name)
                continue
            s = _logit_scale(model_type, name, value) if isinstance(value, (int, float)) else None
            if s is not None:
                if scale is not None and name not in handled:
                    raise NotImplementedError(f"config has several logit scales ({name} and an "
                                              "earlier one); fastweight refuses to guess their order")
                scale = None if s == 1.0 else s
                handled.add(name)
                continue
            raise NotImplementedError(
                f"config.{name}={value!r} (model_type {model_type!r}) looks like a transform of the "
                "LM-head logits that fastweight does not know how to apply; refusing rather than "
                "computing a wrong loss. Known: final_logit_softcapping, logit_scale (cohere), "
                "logits_scaling (granite, minicpm3, hyperclovax), lm_head_multiplier (falcon_h1)")
    return LMHead(weight=weight, bias=bias, softcap=softcap, logit_scale=scale)


def is_peft_model(model) -> bool:
    """True for a PEFT wrapper; duck-typed, so that fastweight.hf does not import peft."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``, where the
    adapter layers are injected in place), else ``model`` itself.

    Needed because ``PeftModel.base_model`` is PEFT's tuner (``LoraModel``), whose forward is the
    whole causal LM: running it as the "base" would return the logits, not the hidden states.
    """
    return model.get_base_model() if is_peft_model(model) else model


def _base(model):
    model = unwrap_peft(model)
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        return base
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None and dec is not model:
            return dec
    for name in ("model", "transformer"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise NotImplementedError(f"cannot find the base (decoder) model of {type(model).__name__}")


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """Final hidden states (B, T, D) of ``model``, after its final norm, without the logits.

    Runs the base model (``model.base_model``, else ``model.get_decoder()``) and returns its
    ``last_hidden_state``. Extra keyword arguments (``position_ids`` for packed rows, ...) are
    passed through.
    """
    base = _base(model)
    kwargs.setdefault("use_cache", False)
    out = base(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
    hs = getattr(out, "last_hidden_state", None)
    if hs is None:
        hs = out[0]
    return hs


@dataclass
class HeadInputs:
    """What ``weighted_ce`` / ``sequence_losses`` take for a model's LM head: the final hidden
    states (the logit scale folded in), the head's weight and bias in the hidden states' dtype,
    the labels (flattened for packed rows), ``cu_seqlens`` and the softcap."""
    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    cu_seqlens: Tensor | None
    softcap: float | None

    def loss_options(self) -> dict:
        """Keyword arguments of ``weighted_ce`` besides hidden, weight and labels."""
        return {"bias": self.bias, "cu_seqlens": self.cu_seqlens, "shift": True,
                "softcap": self.softcap}


def head_inputs(model, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                head: LMHead | None = None, model_kwargs: dict | None = None) -> HeadInputs:
    """Run the base model and gather the inputs of the fused loss, without the logits.

    ``labels`` are aligned with ``input_ids`` (HF convention; the loss shifts them). Padded
    rows: (B, T) with ``attention_mask``. Packed rows: input_ids (1, N), ``position_ids``
    restarting at 0 for each sample and ``cu_seqlens`` (B+1,).
    """
    head = head or find_lm_head(model)
    kwargs = dict(model_kwargs or {})
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden = hidden_states(model, input_ids, attention_mask, **kwargs)
    weight, bias = head.weight, head.bias
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    if head.logit_scale is not None:
        # scale * (h @ W.T + b) = (scale * h) @ W.T + scale * b: exact for a linear head.
        hidden = hidden * head.logit_scale
        if bias is not None:
            bias = bias * head.logit_scale
    if cu_seqlens is not None:
        if hidden.dim() == 3:
            if hidden.shape[0] != 1:
                raise ValueError("with `cu_seqlens` the packed batch must be one row (1, N), got "
                                 f"hidden of shape {tuple(hidden.shape)}")
            hidden = hidden[0]
        if labels.dim() == 2:
            labels = labels.reshape(-1)
    return HeadInputs(hidden=hidden, weight=weight, bias=bias, labels=labels,
                      cu_seqlens=cu_seqlens, softcap=head.softcap)


def causal_lm_loss(model, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                   sample_weights: Tensor | None = None, *, num_items=None,
                   sample_reduction: str = "token", reduction: str = "mean",
                   cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                   head: LMHead | None = None, model_kwargs: dict | None = None,
                   **weighted_ce_options) -> Tensor:
    """The (weighted) causal-LM loss of ``model`` via ``fastweight.weighted_ce``, no logits.

    Rows and labels as in ``head_inputs``; the shift happens inside (``shift=True``). The head's
    bias, ``final_logit_softcapping`` and logit scale are applied. ``weighted_ce_options`` go to
    ``weighted_ce`` (``ignore_index``, ``label_smoothing``, ``impl``, ``chunk_bytes``, ...).
    """
    from fastweight import weighted_ce  # at call time: fastweight.hf loads before the core

    inputs = head_inputs(model, input_ids, labels, attention_mask, cu_seqlens=cu_seqlens,
                         position_ids=position_ids, head=head, model_kwargs=model_kwargs)
    return weighted_ce(inputs.hidden, inputs.weight, inputs.labels, sample_weights,
                       sample_reduction=sample_reduction, reduction=reduction, num_items=num_items,
                       **inputs.loss_options(), **weighted_ce_options)


@torch.no_grad()
def sample_losses(model, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None, *,
                  cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                  head: LMHead | None = None, **options) -> Tensor:
    """Per-sample mean response-token loss f_i, (B,) fp32, under no_grad (``shift=True``).

    Labels equal to ``ignore_index`` (-100) do not count; a sample with no counted token gets 0.
    Packed rows: pass ``cu_seqlens`` (and ``position_ids``) with input_ids (1, N).
    """
    from fastweight import sequence_losses

    inputs = head_inputs(model, input_ids, labels, attention_mask, cu_seqlens=cu_seqlens,
                         position_ids=position_ids, head=head)
    return sequence_losses(inputs.hidden, inputs.weight, inputs.labels, **inputs.loss_options(),
                           **options).float()


_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype",
                         "use_cache", "_attn_implementation", "attn_implementation",
                         "_commit_hash", "output_hidden_states", "output_attentions",
                         "return_dict", "use_return_dict"}


def model_hash(model) -> str:
    """sha256 of the model's config (without volatile keys such as dtype or the path) and of its
    parameter names and shapes. Identifies which pre-trained model produced a scores file."""
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()


@torch.no_grad()
def check_head(model, input_ids: Tensor, labels: Tensor | None = None, *, max_tokens: int = 32,
               rtol: float | None = None, head: LMHead | None = None) -> float:
    """Compare fastweight's loss with the model's own logits + cross-entropy on a short input.

    A guard against architectures whose forward does something between the base model and the
    head that ``find_lm_head`` cannot see. ``input_ids`` is one row (T,) or (1, T); only its
    first ``max_tokens`` tokens are used. Returns the relative difference; raises
    ``NotImplementedError`` when it exceeds ``rtol`` (default 1e-4 in fp32, 2e-2 otherwise).
    """
    ids = input_ids.reshape(1, -1)[:, :max_tokens]
    if ids.shape[1] < 2:
        return 0.0
    lab = ids if labels is None else labels.reshape(1, -1)[:, :max_tokens]
    if (lab[:, 1:] == -100).all():
        lab = ids
    ours = sample_losses(model, ids, lab, head=head)[0].double()
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    ref = torch.nn.functional.cross_entropy(logits, lab[0, 1:], ignore_index=-100).double()
    dtype = next(model.parameters()).dtype
    tol = rtol if rtol is not None else (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2)
    rel = float((ours - ref).abs() / ref.abs().clamp_min(1e-6))
    if not rel <= tol:
        raise NotImplementedError(
            f"fastweight's loss for {type(model).__name__} ({float(ours):.6g}) differs from the "
            f"model's own logits + cross-entropy ({float(ref):.6g}) by {rel:.3g} relative: this "
            "architecture transforms its logits in a way fastweight does not reproduce")
    return rel

"""Tiny Hugging Face models and a tokenizer built in code: nothing is downloaded.

Shared by the scoring tests (issue 5) and the trainer tests (issue 6). Everything is
deterministic given the seed.

    tok = make_tokenizer()                      # PreTrainedTokenizerFast, BOS/EOS/PAD + chat template
    model = make_model("llama", vocab_size=len(tok))
    path = save_pretrained(tmp_path / "m", model, tok)   # for AutoModelForCausalLM.from_pretrained
    rows = make_rows(20)                         # prompt/response dicts; make_message_rows, make_text_rows
    write_jsonl(tmp_path / "d.jsonl", rows)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the a one two three red blue green cat dog bird fish tree house car road sun moon star "
         "runs jumps sits eats sees likes has is was big small fast slow old new happy sad "
         "and or but then so because when where what who why how yes no maybe please thanks "
         "question answer tell me about write story short long number add plus minus equals "
         "zero four five six seven eight nine ten hello world good bad day night").split()

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(*, eos: bool = True, chat_template: bool = True):
    """A word-level fast tokenizer over ``WORDS`` (plus digits), with a BOS added by
    ``tok(text)`` (like Llama), EOS, PAD and a minimal chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for t in [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"], *CHAT_TOKENS,
              *WORDS, *"0123456789", ".", ",", "?", "!"]:
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    bos_id = vocab[SPECIAL["bos"]]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B",
        special_tokens=[(SPECIAL["bos"], bos_id)])
    kwargs = dict(tokenizer_object=tk, bos_token=SPECIAL["bos"], pad_token=SPECIAL["pad"],
                  unk_token=SPECIAL["unk"], additional_special_tokens=list(CHAT_TOKENS))
    if eos:
        kwargs["eos_token"] = SPECIAL["eos"]
    tok = PreTrainedTokenizerFast(**kwargs)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(arch: str, vocab_size: int, **overrides):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # the shape of every Llama-like test model
    small = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=False, **small)
    elif arch == "gemma2":
        cfg = Gemma2Config(head_dim=12, final_logit_softcapping=2.5, attn_logit_softcapping=50.0,
                           sliding_window=64, **small)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=512,
                         tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=False, **small)
    elif arch == "cohere":
        from transformers import CohereConfig
        cfg = CohereConfig(logit_scale=0.5, tie_word_embeddings=True, **small)
    elif arch == "granite":
        from transformers import GraniteConfig
        cfg = GraniteConfig(logits_scaling=4.0, tie_word_embeddings=False, **small)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


ARCHS = ("llama", "gemma2", "gpt2", "qwen2")


def make_model(arch: str = "llama", vocab_size: int = 101, *, seed: int = 0, head_scale: float = 1.0,
               dtype=torch.float32, **config_overrides):
    """A tiny randomly initialised causal LM (eval mode, fp32). ``head_scale`` multiplies the
    LM-head weight so that logits are large enough for softcapping to matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(arch, vocab_size, **config_overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    return model.to(dtype).eval()


def save_pretrained(path, model, tokenizer) -> str:
    """Save model + tokenizer into ``path`` (a local directory usable as ``--model``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_rows(n: int = 20, *, seed: int = 0, lo: int = 1, hi: int = 24) -> list[dict]:
    """prompt/response rows of varied lengths."""
    rng = random.Random(seed)
    return [{"prompt": _sentence(rng, lo, hi), "response": _sentence(rng, lo, hi)} for _ in range(n)]


def make_message_rows(n: int = 10, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _sentence(rng, 2, 6)}] if rng.random() < 0.5 else []
        for _turn in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": _sentence(rng, 1, 10)})
            msgs.append({"role": "assistant", "content": _sentence(rng, 1, 10)})
        rows.append({"messages": msgs})
    return rows


def make_text_rows(n: int = 10, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": _sentence(rng, 2, 30)} for _ in range(n)]


def write_jsonl(path, rows) -> str:
    path = Path(path)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def scored_run(directory: Path) -> tuple[Path, str, str, str]:
    """A tiny saved Llama, 24 rows of its data and their FLOW scores (``fastweight score``), in
    ``directory``: (directory, model path, data path, scores path)."""
    from fastweight.cli import main as cli

    tok = make_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    model_path = save_pretrained(directory / "model", model, tok)
    data_path = write_jsonl(directory / "data.jsonl", make_rows(24, hi=10))
    scores_path = str(directory / "scores.safetensors")
    assert cli(["score", "--model", model_path, "--data", data_path, "--out", scores_path, "--quiet",
                "--device", "cpu"]) == 0
    return directory, model_path, data_path, scores_path


def train_config(run: tuple, out: str, **overrides):
    """A short CPU TrainConfig on a ``scored_run``, writing to ``<directory>/<out>``."""
    from fastweight.training import TrainConfig

    directory, model_path, data_path, scores_path = run
    base = dict(model=model_path, data=data_path, scores=scores_path, out=str(directory / out), lr=3e-3,
                steps=6, batch_tokens=128, progress=False, plot=False, warmup=1)
    base.update(overrides)
    return TrainConfig(**base)


def weighted_losses(summary: dict) -> list[float]:
    """The weighted training losses of a training summary's history."""
    return [r["loss_weighted"] for r in summary["history"] if "loss_weighted" in r]

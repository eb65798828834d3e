"""LoRA through PEFT (issue 15, part 1): ``fastweight train --lora-r`` and FlowTrainer with a
PeftModel, on a tiny Llama built from a config."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures in tests/
from hf_fixtures import train_config, weighted_losses  # noqa: E402,F401

from fastweight.cli import main as cli  # noqa: E402
from fastweight.training import train  # noqa: E402


def _base_model(scored_run):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(scored_run[1]).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_loss_drops_and_only_the_adapter_changes(scored_run):
    s = train(train_config(scored_run, "lora_drop", lora_r=4, lr=2e-2, steps=12, save_final=False))
    assert s["eval"]["eval_target_loss"] < s["eval_before"]["eval_target_loss"] - 0.1
    base = dict(_base_model(scored_run).named_parameters())
    trained = s["model"]
    adapters = changed = 0
    for name, param in trained.named_parameters():
        if "lora_" in name:
            adapters += 1
            assert param.requires_grad, name
            changed += int("lora_B" in name and bool(param.detach().abs().sum() > 0))
            continue
        assert not param.requires_grad, name
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(param.detach(), base[plain].detach()), name  # frozen: bit-identical
    assert adapters > 0 and changed == adapters // 2  # every lora_B moved away from its zero init


def test_lora_head_gets_no_gradient(scored_run):
    from fastweight.hf import find_lm_head
    from fastweight.training.lora import wrap_with_lora
    from fastweight.training.objective import LossModule
    model = wrap_with_lora(_base_model(scored_run).train(), train_config(scored_run, "unused", lora_r=4))
    ids = torch.randint(5, 60, (3, 9))
    loss, _ = LossModule(model, "token", "torch")(ids, ids.clone())
    loss.backward()
    head = find_lm_head(model).weight
    assert not head.requires_grad and head.grad is None
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A: 0 (B = 0)
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_lora_resume_equals_uninterrupted(scored_run):
    full = train(train_config(scored_run, "lora_full", lora_r=4, lr=1e-2, lora_dropout=0.1, save_final=False))
    part = train(train_config(scored_run, "lora_resumed", lora_r=4, lr=1e-2, lora_dropout=0.1, stop_after=3,
                      save_final=False))
    folder = Path(part["out"]) / "checkpoints" / "step-00000003"
    assert (folder / "adapter.safetensors").exists() and not (folder / "model.safetensors").exists()
    rest = train(train_config(scored_run, "lora_resumed", lora_r=4, lr=1e-2, lora_dropout=0.1, resume=True,
                      save_final=False))
    torch.testing.assert_close(weighted_losses(rest), weighted_losses(full), rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(full["model"].state_dict().items(), rest["model"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="--lora-r"):  # a LoRA checkpoint needs a LoRA run
        train(train_config(scored_run, "lora_resumed", resume=True, save_final=False))


def test_lora_final_adapter_reloads_with_peft(scored_run):
    from peft import PeftModel
    s = train(train_config(scored_run, "lora_final", lora_r=4, lr=2e-2, steps=4))
    final = Path(s["final_dir"])
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    assert not (final / "model.safetensors").exists() and not (final / "merged").exists()
    ids = torch.randint(5, 60, (2, 11))
    reloaded = PeftModel.from_pretrained(_base_model(scored_run), str(final)).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(s["model"].eval(), ids))
    assert not torch.allclose(_logits(reloaded, ids), _logits(_base_model(scored_run), ids), atol=1e-4)


def test_lora_cli_merge_writes_the_merged_model(scored_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    d, mp, dp, sp = scored_run
    out = d / "lora_merge"
    assert cli(["train", "--model", mp, "--data", dp, "--scores", sp, "--out", str(out),
                "--steps", "3", "--batch-tokens", "128", "--lr", "2e-2", "--no-progress",
                "--lora-r", "4", "--lora-alpha", "16", "--lora-target-modules", "q_proj", "v_proj",
                "--merge"]) == 0
    assert "LoRA r=4: " in capsys.readouterr().err
    ids = torch.randint(5, 60, (2, 11))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final" / "merged")).eval()
    assert not any("lora" in k for k in merged.state_dict())
    adapter = PeftModel.from_pretrained(_base_model(scored_run), str(out / "final")).eval()
    assert sorted(adapter.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert adapter.peft_config["default"].lora_alpha == 16
    torch.testing.assert_close(_logits(merged, ids), _logits(adapter, ids), rtol=1e-4, atol=1e-5)
    assert (out / "final" / "merged" / "tokenizer.json").exists()


@pytest.mark.parametrize("flags, code, needle", [
    (["--merge"], 2, "--merge"),
    (["--lora-r", "4", "--lora-dropout", "1.5"], 2, "--lora-dropout"),
    (["--lora-r", "4", "--fsdp"], 2, "--fsdp"),
    (["--lora-r", "4", "--lora-target-modules", "no_such_proj"], 1, "--lora-target-modules"),
])
def test_lora_bad_flags_are_one_line(scored_run, capsys, flags, code, needle):
    d, mp, dp, sp = scored_run
    out = d / f"lora_bad_{code}_{len(flags)}"
    assert cli(["train", "--model", mp, "--data", dp, "--scores", sp, "--out", str(out),
                "--steps", "1", "--no-progress", *flags]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("fastweight train: error:")
    assert not out.exists()


def test_flow_trainer_with_peft(scored_run, tmp_path):
    pytest.importorskip("accelerate")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, TrainingArguments
    from fastweight import data as fwdata
    from fastweight.hf import FlowTrainer
    d, mp, dp, sp = scored_run
    tok = AutoTokenizer.from_pretrained(mp)
    tokd, _ = fwdata.tokenize_rows(fwdata.load_rows(dp), tok)
    tokd = tokd.add_column("sample_weight", [0.5] * len(tokd)).remove_columns(["length", "index"])
    model = get_peft_model(_base_model(scored_run), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                             max_steps=3, report_to=[], use_cpu=True, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no")
    out = FlowTrainer(model=model, args=args, train_dataset=tokd, processing_class=tok).train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    for name, param in model.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        assert moved == ("lora_B" in name or "lora_A" in name), name

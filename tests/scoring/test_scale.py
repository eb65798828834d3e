"""Scoring at scale (issue 15, part 4): ``fastweight score --dtype bf16`` and the loader that
puts each rank's model straight onto its device, without a device_map."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures in tests/
from hf_fixtures import train_config, weighted_losses  # noqa: E402,F401

from fastweight.cli import main as cli  # noqa: E402
from fastweight.scoring import read_scores  # noqa: E402


def test_score_in_bf16_is_close_to_fp32(scored_run, tmp_path):
    d, mp, dp, sp = scored_run
    out = tmp_path / "bf16.safetensors"
    assert cli(["score", "--model", mp, "--data", dp, "--out", str(out), "--quiet",
                "--device", "cpu", "--dtype", "bf16"]) == 0
    fp32, bf16 = read_scores(sp), read_scores(str(out))
    assert bf16["metadata"]["dtype"] == "bfloat16" and fp32["metadata"]["dtype"] == "float32"
    assert not torch.equal(bf16["loss"], fp32["loss"])  # it really ran in bf16
    # bf16 keeps 8 bits of mantissa: each sample's mean loss within a few parts in 100
    torch.testing.assert_close(bf16["loss"], fp32["loss"], rtol=3e-2, atol=0)


def test_loader_puts_the_weights_on_the_device_without_a_device_map(scored_run, monkeypatch):
    # The "meta" device stands in for a rank's GPU: from_pretrained must run inside a
    # torch.device context of the rank's device (transformers then loads onto it). The spy
    # loads on the CPU itself, as transformers refuses to load weights onto "meta".
    from transformers import AutoModelForCausalLM
    from fastweight import runtime
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen["device"], seen["kwargs"] = torch.empty(0).device, dict(kwargs)
        with torch.device("cpu"):
            return original(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = runtime.load_model_and_tokenizer(scored_run[1], torch.device("meta"), torch.float32)
    assert seen["device"] == torch.device("meta") and "device_map" not in seen["kwargs"]
    assert all(p.device.type == "meta" for p in model.parameters())

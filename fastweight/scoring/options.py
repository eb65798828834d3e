"""The flags of ``fastweight score`` and ``fastweight weights`` (no torch import: ``--help``
stays fast)."""
from __future__ import annotations

import argparse

from fastweight.cli import add_data_format_arguments, positive_int


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastweight score``."""
    parser.add_argument("--model", required=True,
                        help="pre-trained model: a local folder or a hub name (AutoModelForCausalLM)")
    parser.add_argument("--data", required=True,
                        help="JSONL/JSON/Parquet file, saved dataset folder, or hub name")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--split", default=None,
                        help="dataset split (default: the only split, or 'train')")
    parser.add_argument("--temperature", default="median",
                        help="tau of exp(-loss / tau): 'median' or a positive number")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto",
                        help="model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--token-budget", type=positive_int, default=16384,
                        help="tokens per batch, padding included")
    parser.add_argument("--pack", action="store_true",
                        help="pack samples into one row (cu_seqlens) instead of padding")
    add_data_format_arguments(parser, max_length=None)
    parser.add_argument("--shard-size", type=positive_int, default=4096,
                        help="rows per resumable shard")
    parser.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after merging")
    parser.add_argument("--no-check-head", action="store_true",
                        help="skip comparing fastweight's loss with the model's own logits on one sample")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bars (also off when stderr is not a terminal)")
    parser.add_argument("--_stop-after-shards", dest="stop_after_shards", type=int, default=None,
                        help=argparse.SUPPRESS)  # tests: simulate a crash


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastweight weights``."""
    parser.add_argument("scores", help="scores .safetensors written by `fastweight score`")
    parser.add_argument("--plot", default=None,
                        help="write loss/weight histograms to this image file (default: no plot)")


def parse_temperature(value) -> str | float:
    """'median' or a positive float; a UsageError names the flag otherwise."""
    from fastweight.cli import UsageError

    if value == "median":
        return "median"
    try:
        tau = float(value)
    except (TypeError, ValueError):
        tau = float("nan")
    if not tau > 0:
        raise UsageError(f"--temperature must be 'median' or a positive number, got {value!r}")
    return tau

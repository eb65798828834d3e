"""The scores file that ``fastweight score`` writes and ``fastweight train`` reads: safetensors
with ``loss``, ``num_tokens``, ``index`` and ``weight`` in row order, plus metadata naming the
data (a content fingerprint) and the model (a config + shapes hash) it was made from.

Writes are atomic (a temporary file, then ``os.replace``), so a crash never leaves half a file.
"""
from __future__ import annotations

import os
from pathlib import Path

SCORES_FORMAT = "fastweight-scores/1"
SCORE_TENSORS = ("loss", "num_tokens", "index", "weight")

__all__ = ["read_scores", "write_scores", "ScoresMismatchError", "save_atomic", "load_tensors",
           "SCORES_FORMAT"]


class ScoresMismatchError(ValueError):
    """A scores file does not belong to the dataset or model it is used with."""


def save_atomic(tensors: dict, path, metadata: dict) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` through a temporary file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in metadata.items()})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; FileNotFoundError naming it if absent."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def write_scores(path, loss, num_tokens, index, weight, metadata: dict) -> None:
    """Write a scores file atomically (tmp + os.replace)."""
    save_atomic({"loss": loss.float(), "num_tokens": num_tokens.long(), "index": index.long(),
                 "weight": weight.float()}, path, {"format": SCORES_FORMAT, **metadata})


def read_scores(path, expect_fingerprint: str | None = None,
                expect_model_hash: str | None = None) -> dict:
    """Read a scores file: ``{"loss", "num_tokens", "index", "weight": Tensor, "metadata": dict}``.

    Raises ``ScoresMismatchError`` (a ValueError) when the file was made from another dataset
    (``expect_fingerprint``) or another model (``expect_model_hash``), and ValueError when the
    file is not a fastweight scores file.
    """
    tensors, metadata = load_tensors(path)
    missing = set(SCORE_TENSORS) - set(tensors)
    if metadata.get("format") != SCORES_FORMAT or missing:
        raise ValueError(f"{str(path)!r} is not a fastweight scores file (format "
                         f"{metadata.get('format')!r}, missing tensors {sorted(missing)})")
    checks = (  # (metadata key, expected value, what differs, source key, advice)
        ("data_fingerprint", expect_fingerprint, "dataset", "data_path",
         "Rerun `fastweight score` on this data."),
        ("model_hash", expect_model_hash, "model", "model",
         "Score with the pre-trained model you fine-tune."))
    for key, expected, what, source, advice in checks:
        found = metadata.get(key)
        if expected is not None and found != expected:
            raise ScoresMismatchError(
                f"{str(path)!r} was scored with another {what}: its {key} is {(found or '?')[:16]}…, "
                f"this {what}'s is {expected[:16]}… (scored: {metadata.get(source, '?')}). {advice}")
    return {**tensors, "metadata": metadata}

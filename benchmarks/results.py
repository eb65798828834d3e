"""Results: records, the machine they were measured on, ratios, JSON files and tables.

A record is one (case, op, impl) measurement:
``{"device", "case", "op", "impl", "N", "D", "V", "dtype", "softcap", "frozen_head", "ms",
"peak_mem_mib", "peak_mem_gib", "floor_ms", "frac_of_floor", "ratio_to_naive", "ratios", "loss",
"note", ...}``. ``frac_of_floor`` = floor_ms / ms (1.0 = as fast as the GEMMs alone). A failure
is a record too: ``error`` is "unavailable: ...", "OOM: ...", "skipped: ..." or the exception,
and ``ms`` is null.

A results file is ``{"machine": machine_info(), "records": [...], ...}``, strict JSON.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from benchmarks.cases import Case
from benchmarks.peers import note_of

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_slug(device="cpu") -> str:
    """The card's or the CPU's model as a slug: 'nvidia-h100-80gb-hbm3', 'intel-xeon'."""
    dev = torch.device(device)
    model = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return re.sub(r"-?(r|tm|cpu|processor)-?(?=-|$)", "", slug).strip("-") or "unknown"


def device_name(device="cpu") -> str:
    """'cpu-<model-slug>' or 'cuda-<card-slug>', used in file names and records."""
    return f"{torch.device(device).type}-{device_slug(device)}"


def git_commit() -> str | None:
    """HEAD of the checkout, with "+dirty" when the tree has uncommitted changes."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        if commit and git("status", "--porcelain").stdout.strip():
            commit += "+dirty"
        return commit
    except Exception:
        return None


def machine_info(device="cpu") -> dict:
    """What a reader needs to compare two results files."""
    info = {
        "device": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for module in ("triton", "fastweight", "liger_kernel", "cut_cross_entropy"):
        with contextlib.suppress(Exception):
            info[module] = getattr(__import__(module), "__version__", "importable")
    for var in ("FASTWEIGHT_CHUNK_BYTES", "FASTWEIGHT_TRITON_CHUNK_BYTES"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def measured(record: dict) -> bool:
    """The record holds a time (not a failure)."""
    ms = record.get("ms")
    return ms is not None and ms == ms


def make_record(device, case: Case, op: str, impl: str, ms: float, floor_ms: float,
                peak_mem_mib: float = float("nan"), loss: float | None = None, **extra) -> dict:
    """A record; ``note`` in ``extra`` is appended to the implementation's own note."""
    record = {
        "device": device_name(device), "case": case.name, "op": op, "impl": impl,
        "N": case.N, "D": case.D, "V": case.V, "dtype": case.dtype,
        "softcap": case.softcap, "frozen_head": case.frozen_head,
        "ms": ms, "peak_mem_mib": peak_mem_mib,
        "peak_mem_gib": peak_mem_mib / 1024.0 if peak_mem_mib is not None else None,
        "floor_ms": floor_ms,
        "frac_of_floor": floor_ms / ms if ms and ms > 0 and floor_ms == floor_ms else None,
        "ratio_to_naive": None, "loss": loss,
    }
    note = note_of(impl)
    deviation = extra.pop("note", None)
    if deviation:
        note = f"{note}; {deviation}" if note else deviation
    if note:
        record["note"] = note
    record.update(extra)
    return record


def add_ratios(records: list[dict]) -> list[dict]:
    """Fill ratio_to_naive (ms / naive ms) and ratios {other impl: ms / other ms} among the
    records of the same (device, case, op)."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in records:
        if measured(r):
            groups.setdefault((r["device"], r["case"], r["op"]), {})[r["impl"]] = r["ms"]
    for r in records:
        if not measured(r):
            continue
        peers = groups.get((r["device"], r["case"], r["op"]), {})
        naive = peers.get("naive")
        r["ratio_to_naive"] = r["ms"] / naive if naive else None
        r["ratios"] = {k: r["ms"] / v for k, v in peers.items() if k != r["impl"] and v}
    return records


def json_safe(obj):
    """NaN and inf as null, recursively: strict JSON."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def results_path(device="cpu", directory: Path | str | None = None, date: str | None = None,
                 prefix: str | None = None) -> Path:
    """<directory>/<device>-<date>.json, or <prefix>-<model-slug>-<date>.json (e.g. the GPU
    check's gpu-<card>-<date>.json)."""
    date = date or _dt.date.today().isoformat()
    stem = f"{prefix}-{device_slug(device)}" if prefix else device_name(device)
    return Path(directory or RESULTS_DIR) / f"{stem}-{date}.json"


def write_results(records: list[dict], device="cpu", path: Path | str | None = None,
                  extra: dict | None = None, merge: bool = True) -> Path:
    """Write {"machine", "records"} JSON. With ``merge``, records of an existing file at the same
    path are kept unless the new ones replace the same (device, case, op, impl)."""
    path = Path(path) if path else results_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    if merge and path.exists():
        with contextlib.suppress(Exception):
            old = json.loads(path.read_text()).get("records", [])

    def key(r: dict) -> tuple:
        return r["device"], r["case"], r["op"], r["impl"]
    new_keys = {key(r) for r in records}
    merged = [r for r in old if key(r) not in new_keys] + list(records)
    add_ratios(merged)
    doc = {"machine": machine_info(device), "records": merged, **(extra or {})}
    path.write_text(json.dumps(json_safe(doc), indent=1) + "\n")
    return path


def read_results(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
def format_progress(record: dict) -> str:
    """One line per record, while a run goes."""
    ms = f"{record['ms']:10.2f} ms" if measured(record) else "         - ms"
    mem = record.get("peak_mem_mib")
    mem = f"  mem {mem:8.1f} MiB" if mem is not None and mem == mem else ""
    err = f"  {record['error'][:100]}" if record.get("error") else ""
    return (f"  {record['case']:16} {record['op']:8} {record['impl']:18} {ms}  "
            f"floor {record['floor_ms']:9.4g} ms{mem}{err}")


def format_table(records: list[dict], ref: str = "fastweight", label: str = "fw") -> str:
    """A short table: ms, % of the floor, peak GiB, ratio to ``ref`` (the first impl whose name
    starts with it, per (case, op); headed "vs <label>"), and the loss or the error."""
    lines = [f"{'case':16} {'op':8} {'impl':18} {'ms':>9} {'floor%':>7} {'GiB':>6} {'vs ' + label:>6}  "
             "loss / error"]
    for r in records:
        base = next((p for p in records if p["case"] == r["case"] and p["op"] == r["op"]
                     and p["impl"].startswith(ref) and measured(p)), None)
        head = f"{r['case']:16} {r['op']:8} {r['impl']:18}"
        if not measured(r):
            lines.append(f"{head} {'-':>9} {'-':>7} {'-':>6} {'-':>6}  {(r.get('error') or '')[:60]}")
            continue
        gib = r.get("peak_mem_gib")
        mem = f"{gib:.2f}" if gib is not None and gib == gib else "-"
        frac = f"{100 * r['frac_of_floor']:6.1f}%" if r.get("frac_of_floor") else f"{'-':>7}"
        vs = f"{r['ms'] / base['ms']:.2f}" if base else "-"
        loss = f"{r['loss']:.5g}" if r.get("loss") is not None else ""
        lines.append(f"{head} {r['ms']:9.2f} {frac} {mem:>6} {vs:>6}  {loss}")
    return "\n".join(lines)

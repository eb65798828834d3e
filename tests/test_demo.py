"""``fastweight demo``: the quick run works end to end; the README's demo table is the one a
fresh default run prints (issue 13), so it cannot go stale."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastweight.demo import ARMS, DEFAULT_OUT

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(pre-trained|standard|FLOW mean-norm|FLOW)\s+((?:\d+\.\d{3} /\s*\d+\.\d%\s*){5})")


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "fastweight", "demo", "--quick", "--no-progress",
                        "--out", str(out)], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t < 240
    assert "FLOW - standard" in r.stdout and "FLOW mean-norm - standard" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"pre-trained", "standard", "FLOW", "FLOW mean-norm"}
    assert set(res["clipped_steps"]) == {"standard", "FLOW", "FLOW mean-norm"}
    assert all(0 <= n <= res["finetune_steps"] for n in res["clipped_steps"].values())
    assert (out / "demo.png").stat().st_size > 1000
    assert (out / "results.txt").exists()


def _readme_table() -> dict[str, list[tuple[float, float]]]:
    """The README's demo table: per model, (loss, accuracy %) for general, task all/near/mid/far."""
    text = (ROOT / "README.md").read_text()
    table = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            cells = re.findall(r"(\d+\.\d{3}) /\s*(\d+\.\d)%", match.group(2))
            table[match.group(1)] = [(float(loss), float(acc)) for loss, acc in cells]
    return table


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One full default run (seed 0), shared by every assertion below (~2 min on 2 cores)."""
    out = tmp_path_factory.mktemp("demo-default") / "out"
    r = subprocess.run([sys.executable, "-m", "fastweight", "demo", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _mismatches(readme: dict, results: dict) -> list:
    """Cells of the README table that differ from ``results.json`` by more than one unit of the
    printed last digit (another CPU may round the other way)."""
    wrong = []
    if set(readme) != {"pre-trained", *ARMS}:
        return [("models", sorted(readme))]
    for name, cells in readme.items():
        result = results["table"][name]
        measured = [result["general"]["all"]] + [result["task"][g] for g in ("all", "near", "mid", "far")]
        if len(cells) != len(measured):
            wrong.append((name, "cells", len(cells)))
        for (loss, acc), fresh in zip(cells, measured):
            if abs(loss - fresh["loss"]) > 1.5e-3 or abs(acc - 100 * fresh["acc"]) > 0.15:
                wrong.append((name, loss, acc, fresh))
    return wrong


def test_readme_demo_table_matches_a_fresh_default_run(default_run):
    assert default_run["seed"] == 0 and not default_run["quick"]
    assert _mismatches(_readme_table(), default_run) == []


def test_a_stale_readme_cell_is_caught(default_run):
    readme = _readme_table()
    loss, acc = readme["FLOW"][0]
    readme["FLOW"][0] = (loss + 0.01, acc)
    assert len(_mismatches(readme, default_run)) == 1


def test_demo_output_folder_is_ignored_by_git():
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert f"/{DEFAULT_OUT}/" in ignored or DEFAULT_OUT in ignored

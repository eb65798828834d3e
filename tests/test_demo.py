import json
import subprocess
import sys
import time


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "fastweight", "demo", "--quick", "--no-progress",
                        "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t < 120
    assert "FLOW - standard" in r.stdout and "standard" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert set(res["table"]) == {"pre-trained", "standard", "FLOW", "FLOW mean-norm"}
    assert set(res["clipped_steps"]) == {"standard", "FLOW", "FLOW mean-norm"}
    assert (out / "demo.png").stat().st_size > 1000
    assert (out / "results.txt").exists()

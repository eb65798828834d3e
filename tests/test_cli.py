"""The command line as users meet it (issue 14): help with defaults and no torch import, one-line
errors with the right exit status and no half-written output, quiet output, the weights table."""
from __future__ import annotations

import argparse
import fcntl
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from hf_fixtures import make_model, make_rows, make_tokenizer, save_pretrained, write_jsonl  # noqa: E402

from fastweight.cli import COMMANDS, HelpFormatter, build_parser, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ------------------------------------------------------------------------------------------ help

def test_building_the_parsers_imports_no_torch():
    code = ("import sys\n"
            "from fastweight.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['score', '--help'], ['demo', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "print('heavy:', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("heavy: []"), result.stdout[-500:]


def test_every_option_has_help_showing_its_default():
    formatter = HelpFormatter("fastweight")
    checked = 0
    for name, parser in _subcommand_parsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.required or not action.option_strings:
                continue
            assert "default" in text, f"{name} {action.option_strings}: {text!r}"
            if "default" not in action.help:  # the formatter appends the value itself
                assert f"(default: {action.default})" in text, (name, action.option_strings, text)
            checked += 1
    assert checked > 40
    # the values issue 14 names
    train = _subcommand_parsers()["train"]
    helps = {a.option_strings[0]: formatter._expand_help(a) for a in train._actions if a.option_strings}
    assert "(default: 2e-05)" in helps["--lr"] and "(default: flow)" in helps["--weighting"]
    assert "(default: 4096)" in helps["--batch-tokens"] and "(default: 2048)" in helps["--max-length"]
    assert "default: bf16" in helps["--no-bf16"] and "(default: auto)" in helps["--impl"]
    demo = _subcommand_parsers()["demo"]
    demo_help = demo.format_help()
    assert "500" in demo_help and "100" in demo_help  # the step counts


def test_top_level_help_has_one_summary_line_per_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "lives in its own module" not in text
    for name, summary, _, _ in COMMANDS:
        assert re.search(rf"^\s+{name}\s+{re.escape(summary.split()[0])}", text, re.M), name
        assert summary.split()[-1] in text


# ------------------------------------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer()
    model = save_pretrained(d / "model", make_model("llama", vocab_size=len(tok)), tok)
    data = write_jsonl(d / "data.jsonl", make_rows(16, hi=8))
    other = write_jsonl(d / "other.jsonl", make_rows(16, hi=8, seed=7))
    rows = make_rows(6, hi=8)
    rows[4]["response"] = None
    bad = write_jsonl(d / "bad.jsonl", rows)
    scores = d / "scores.safetensors"
    assert main(["score", "--model", model, "--data", data, "--out", str(scores), "--quiet"]) == 0
    return {"dir": d, "model": model, "data": data, "other": other, "bad": bad, "scores": str(scores)}


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastweight", *argv], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=240)


@pytest.mark.parametrize("case", ["missing-scores", "mismatched-scores", "bad-row", "no-such-model",
                                  "bad-row-score"])
def test_cli_failure_is_one_line_and_leaves_nothing(files, case, tmp_path):
    train = ["train", "--model", files["model"], "--data", files["data"], "--out", "run",
             "--steps", "2", "--batch-tokens", "64"]
    argv, status, expected = {
        "missing-scores": (train, 2, r"--weighting flow needs --scores"),
        "mismatched-scores": (train[:4] + [files["other"], "--scores", files["scores"]] + train[5:], 1,
                              r"scored with another dataset"),
        "bad-row": (train[:4] + [files["bad"], "--weighting", "none"] + train[5:], 1,
                    r"--data .*bad\.jsonl, row 4 \(counting from 0\): prompt and response must be strings"),
        "no-such-model": (["train", "--model", "./no-such-model", "--data", files["data"], "--out", "run",
                           "--weighting", "none"], 1, r"--model './no-such-model': no such folder"),
        "bad-row-score": (["score", "--model", files["model"], "--data", files["bad"], "--out",
                           "run/s.safetensors"], 1, r"row 4 \(counting from 0\)"),
    }[case]
    result = _run(*argv, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.match(rf"fastweight (train|score): error: .*{expected}", lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "output written on failure"


def test_local_model_path_never_asks_the_hub(files, tmp_path, monkeypatch, capsys):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    for model in ("./missing", "../missing", str(tmp_path / "missing"), "~/fastweight-missing-model"):
        assert main(["score", "--model", model, "--data", files["data"], "--out",
                     str(tmp_path / "s.safetensors"), "--quiet"]) == 1
        assert "no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["score", "--model", files["data"], "--data", files["data"], "--out",
                 str(tmp_path / "s.safetensors"), "--quiet"]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_usage_and_runtime_statuses(files, tmp_path, capsys):
    assert main(["score", "--model", files["model"], "--data", files["data"], "--out",
                 str(tmp_path / "s"), "--temperature", "cold"]) == 2
    assert main(["train", "--model", files["model"], "--data", files["data"], "--out",
                 str(tmp_path / "r"), "--weighting", "none", "--weight-normalization", "mean"]) == 2
    assert main(["weights", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--temperature" in err[0] and "needs --weighting flow" in err[1]
    assert "does not exist" in err[2]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ quiet

def _run_on_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``fastweight argv`` with stderr on a pseudo-terminal (as a user sees it)."""
    controller, terminal = pty.openpty()
    # a real size: tqdm sizes its bar to the terminal, and draws nothing on a 0-column one
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fastweight", *argv], stdout=subprocess.PIPE,
                            stderr=terminal, env=ENV, cwd=cwd)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the process exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.stdout.read()
    os.close(controller)
    return proc.wait(timeout=240), b"".join(chunks).decode(errors="replace")


def test_no_progress_silences_every_bar_on_a_terminal(files, tmp_path):
    argv = ["train", "--model", files["model"], "--data", files["data"], "--scores", files["scores"],
            "--out", "run", "--steps", "2", "--batch-tokens", "64"]
    status, shown = _run_on_terminal(argv, tmp_path)
    assert status == 0, shown[-2000:]
    assert "train (flow)" in shown and "%|" in shown  # the bars are there on a terminal...
    status, quiet = _run_on_terminal(argv + ["--out", "quiet", "--no-progress"], tmp_path)
    assert status == 0, quiet[-2000:]
    assert "%|" not in quiet and "it/s" not in quiet, quiet  # ...and none with --no-progress
    for third_party in ("Generating", "tokenizing", "Writing model shards", "Loading weights", "Map"):
        assert third_party not in quiet, third_party
    assert "[fastweight train]" in quiet


# ------------------------------------------------------------------------------------------ weights

def test_weights_table_reads_across(files, capsys):
    from fastweight.scoring import read_scores

    assert main(["weights", files["scores"]]) == 0
    text = capsys.readouterr().out
    tau = float(read_scores(files["scores"])["metadata"]["tau"])
    rows = [tuple(map(float, line.split())) for line in text.splitlines()
            if re.match(r"^\s+\d\.\d\d\s", line)]
    assert [q for q, _, _ in rows] == [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
    for _, loss, weight in rows:  # the weight of that very loss
        assert weight == pytest.approx(math.exp(-loss / tau), rel=1e-5)
    losses, weights = [r[1] for r in rows], [r[2] for r in rows]
    assert losses == sorted(losses) and losses[0] < losses[-1]
    assert weights == sorted(weights, reverse=True)  # easy samples (low loss) weigh most
    scores = read_scores(files["scores"])
    assert weights[0] == pytest.approx(float(scores["weight"].max()), rel=1e-5)

"""``fastweight demo``: FLOW versus standard fine-tuning, end to end, offline, on the CPU.

1. builds a small Llama-style model (from ``LlamaConfig``) and a character tokenizer in code;
2. pre-trains it on a "general" corpus (addition facts) with ``fastweight train --weighting none``;
3. scores a fine-tuning task (addition / subtraction / multiplication: close to far from the
   general corpus) with ``fastweight score``, the real scoring pass;
4. fine-tunes twice from the pre-trained model, standard and FLOW, same steps and learning rate,
   with ``fastweight train``;
5. prints a table of general-corpus loss/accuracy (forgetting) and task loss/accuracy, per group,
   and saves a plot.

Whatever the numbers say is what gets printed: nothing is selected after the fact.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastweight import demo_data

__all__ = ["run_demo", "build_tokenizer", "register"]


def build_tokenizer():
    """A character-level fast tokenizer over digits and ``+-*=``: BOS added (Llama-like), EOS, PAD."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *demo_data.CHARS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _write_jsonl(path: Path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@torch.no_grad()
def _answer_metrics(model, tokenizer, rows) -> dict:
    """Per group: mean answer-token loss (answer + EOS) and exact-match accuracy of greedy
    decoding (the argmax is right at every answer position under teacher forcing, which is
    the same as greedy decoding producing the answer and then EOS)."""
    from fastweight import data as fwdata
    from fastweight.hf import hidden_states, find_lm_head
    import datasets
    model.eval()
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    tok, _ = fwdata.tokenize_rows(ds, tokenizer, fmt="prompt_response")
    batch = fwdata.collate([tok[i] for i in range(len(tok))], tokenizer.pad_token_id)
    head = find_lm_head(model)
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    logits = (h[:, :-1] @ head.weight.T).float()  # demo vocabulary: 18 tokens
    target = batch["labels"][:, 1:]
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    ce = (ce * valid).sum(1)
    ok = ((logits.argmax(-1) == target) | ~valid).all(1)
    ntok = valid.sum(1)
    out = {}
    groups = [r.get("group", "all") for r in rows]
    for g in sorted(set(groups)) + ["all"]:
        m = torch.tensor([g == "all" or x == g for x in groups])
        out[g] = {"loss": float(ce[m].sum() / ntok[m].sum()), "acc": float(ok[m].float().mean())}
    return out


def _model_config(vocab_size: int, quick: bool):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64 if quick else 128,
                       intermediate_size=192 if quick else 384,
                       num_hidden_layers=2 if quick else 4, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def run_demo(out: str = "fastweight-demo", *, quick: bool = False, seed: int = 0,
             pretrain_steps: int | None = None, finetune_steps: int | None = None,
             finetune_lr: float = 1e-3, progress: bool = True, verbose: bool = True) -> dict:
    """Run the demo; returns ``{"table": {...}, "weights": {...}, "seconds": ...}``."""
    from transformers import AutoModelForCausalLM
    from fastweight.cli import main as cli
    from fastweight.scoring import read_scores
    from fastweight.train import TrainConfig, train

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    outp = Path(out)
    work = outp / "work"
    work.mkdir(parents=True, exist_ok=True)
    pretrain_steps = pretrain_steps or (60 if quick else 500)
    finetune_steps = finetune_steps or (15 if quick else 100)

    # 1. tokenizer + model from a config
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config(len(tokenizer), quick))
    init_dir = work / "init"
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    general = _write_jsonl(work / "general.jsonl", demo_data.general_rows(3000 if not quick else 1500, seed))
    general_eval_rows = demo_data.general_eval_rows(300, seed + 1)
    task_rows = demo_data.task_rows(100 if not quick else 60, seed + 2)
    task_test_rows = demo_data.task_rows(60 if not quick else 30, seed + 3)
    general_eval = _write_jsonl(work / "general_eval.jsonl", general_eval_rows)
    task = _write_jsonl(work / "task.jsonl", task_rows)
    task_test = _write_jsonl(work / "task_test.jsonl", task_test_rows)

    # 2. pre-training (the real training loop, unweighted)
    pre = train(TrainConfig(model=str(init_dir), data=general, out=str(work / "pretrain"),
                            weighting="none", lr=3e-3, warmup=0.05, min_lr_ratio=0.1,
                            steps=pretrain_steps, batch_tokens=1536, clip=1.0, seed=seed,
                            progress=progress, weight_decay=0.01))
    base = pre["final_dir"]

    # 3. the scoring pass, through the CLI code path
    scores_path = work / "scores.safetensors"
    argv = ["score", "--model", base, "--data", task, "--out", str(scores_path), "--device", "cpu"]
    if not progress:
        argv.append("--quiet")
    if cli(argv) != 0:
        raise RuntimeError("fastweight score failed")
    scores = read_scores(scores_path)
    groups = [r["group"] for r in task_rows]
    w_by_group = {g: {"weight": float(scores["weight"][[i for i, x in enumerate(groups) if x == g]].mean()),
                      "loss": float(scores["loss"][[i for i, x in enumerate(groups) if x == g]].mean())}
                  for g in demo_data.GROUPS}

    # 4. fine-tune twice, same budget
    results = {}
    base_model = AutoModelForCausalLM.from_pretrained(base)
    results["pre-trained"] = {"general": _answer_metrics(base_model, tokenizer, general_eval_rows),
                              "task": _answer_metrics(base_model, tokenizer, task_test_rows)}
    for name, weighting in (("standard", "none"), ("FLOW", "flow")):
        r = train(TrainConfig(model=base, data=task, scores=str(scores_path) if weighting == "flow" else None,
                              out=str(work / f"ft-{weighting}"), weighting=weighting, lr=finetune_lr,
                              warmup=0.1, steps=finetune_steps, batch_tokens=512, seed=seed,
                              general_data=general_eval, eval_data=task_test, progress=progress,
                              save_final=False))
        results[name] = {"general": _answer_metrics(r["model"], tokenizer, general_eval_rows),
                         "task": _answer_metrics(r["model"], tokenizer, task_test_rows),
                         "history": [h for h in r["history"] if "loss" in h]}
    seconds = time.perf_counter() - t0

    table = _format_table(results, w_by_group, pretrain_steps, finetune_steps, finetune_lr, seconds)
    if verbose:
        print(table)
    (outp / "results.txt").write_text(table + "\n")
    summary = {"table": {k: {"general": v["general"], "task": v["task"]} for k, v in results.items()},
               "scores_by_group": w_by_group, "seconds": seconds, "seed": seed,
               "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps}
    (outp / "results.json").write_text(json.dumps(summary, indent=1))
    _plot(results, w_by_group, outp / "demo.png")
    return summary


def _format_table(results, w_by_group, pre_steps, ft_steps, lr, seconds) -> str:
    lines = [f"fastweight demo: {pre_steps} pre-training steps, 2 x {ft_steps} fine-tuning steps at lr {lr:g}",
             "",
             "FLOW weights from the pre-trained model (mean per group of the task):",
             *[f"  {g:5s} pre-trained loss {v['loss']:.3f}  weight {v['weight']:.3f}" for g, v in w_by_group.items()],
             "",
             "answer-token loss / exact-match accuracy"
             " (general = held-out facts of the pre-training corpus: forgetting)",
             f"{'model':12s} {'general':>15s} {'task: all':>15s} "
             + " ".join(f"{'task: ' + g:>15s}" for g in demo_data.GROUPS)]
    for name, r in results.items():
        cells = [f"{r['general']['all']['loss']:6.3f} / {r['general']['all']['acc']:5.1%}"]
        for g in ["all", *demo_data.GROUPS]:
            cells.append(f"{r['task'][g]['loss']:6.3f} / {r['task'][g]['acc']:5.1%}")
        lines.append(f"{name:12s} " + " ".join(f"{c:>15s}" for c in cells))
    s, f = results["standard"], results["FLOW"]
    dg = f["general"]["all"]["loss"] - s["general"]["all"]["loss"]
    dt = f["task"]["all"]["loss"] - s["task"]["all"]["loss"]
    lines += ["",
              f"FLOW - standard: general loss {dg:+.3f} ({'less' if dg < 0 else 'more'} forgetting), "
              f"task loss {dt:+.3f} ({'better' if dt < 0 else 'worse'} on the task)",
              f"total time {seconds:.0f} s. One seed and one budget: rerun with --seed / "
              "--finetune-steps / --lr to see how much the gap moves."]
    return "\n".join(lines)


def _plot(results, w_by_group, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name in ("standard", "FLOW"):
        h = results[name]["history"]
        axes[0].plot([x["step"] for x in h], [x["loss"] for x in h], label=name)
    axes[0].set_title("fine-tuning loss (FLOW: weighted)"); axes[0].set_xlabel("step"); axes[0].legend()
    names = list(results)
    cats = ["general", *demo_data.GROUPS]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals_l = [results[name]["general"]["all"]["loss"]] + [results[name]["task"][g]["loss"] for g in demo_data.GROUPS]
        vals_a = [results[name]["general"]["all"]["acc"]] + [results[name]["task"][g]["acc"] for g in demo_data.GROUPS]
        xs = [i + k * width for i in range(len(cats))]
        axes[1].bar(xs, vals_l, width, label=name)
        axes[2].bar(xs, vals_a, width, label=name)
    for ax, t in ((axes[1], "answer loss"), (axes[2], "exact-match accuracy")):
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cats))], cats)
        ax.set_title(t); ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def register(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo: pre-train, score, fine-tune standard vs FLOW",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fastweight-demo", help="output folder (default ./fastweight-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    runs = []
    for k in range(args.seeds):
        out = args.out if args.seeds == 1 else str(Path(args.out) / f"seed{args.seed + k}")
        runs.append(run_demo(out, quick=args.quick, seed=args.seed + k, pretrain_steps=args.pretrain_steps,
                             finetune_steps=args.finetune_steps, finetune_lr=args.lr,
                             progress=args.progress))
    if len(runs) > 1:
        print("\nacross seeds (FLOW - standard):")
        for r in runs:
            t = r["table"]
            print(f"  seed {r['seed']}: general loss "
                  f"{t['FLOW']['general']['all']['loss'] - t['standard']['general']['all']['loss']:+.3f}, "
                  f"task loss {t['FLOW']['task']['all']['loss'] - t['standard']['task']['all']['loss']:+.3f}")
    print(f"\nwrote {args.out}/ (results.txt, results.json, demo.png)")
    return 0

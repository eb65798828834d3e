"""``fastweight demo``: FLOW versus standard fine-tuning, end to end, offline, on the CPU.

1. builds a small Llama-style model (from ``LlamaConfig``) and a character tokenizer in code;
2. pre-trains it on a "general" corpus (addition facts) with ``fastweight train --weighting none``;
3. scores a fine-tuning task (addition / subtraction / multiplication: close to far from the
   general corpus) with ``fastweight score``, the real scoring pass;
4. fine-tunes three times from the pre-trained model with ``fastweight train``, same steps and
   learning rate: standard, FLOW (the paper's weights, whose mean is below 1, so it also takes
   smaller steps) and FLOW with mean-normalised weights (same average step as standard: what
   remains is the reweighting alone);
5. prints a table of general-corpus loss/accuracy (forgetting) and task loss/accuracy, per group,
   and saves a plot.

Whatever the numbers say is what gets printed: nothing is selected after the fact.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastweight import demo_data

__all__ = ["run_demo", "build_tokenizer", "add_arguments", "run_cli", "ARMS", "DEFAULT_OUT"]

DEFAULT_OUT = "fastweight-demo"
# arm name -> (--weighting, --weight-normalization)
ARMS = {"standard": ("none", "none"), "FLOW": ("flow", "none"), "FLOW mean-norm": ("flow", "mean")}


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


def _answer_metrics(model, tokenizer, rows) -> dict:
    """Per group: mean answer-token loss (answer + EOS) and exact-match accuracy of greedy
    decoding (the argmax is right at every answer position under teacher forcing, which is
    the same as greedy decoding producing the answer and then EOS)."""
    import torch
    with torch.no_grad():
        return _answer_metrics_no_grad(model, tokenizer, rows)


def _answer_metrics_no_grad(model, tokenizer, rows) -> dict:
    import datasets
    import torch
    from fastweight import data as fwdata
    from fastweight.hf import find_lm_head, hidden_states
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


def run_demo(out: str = DEFAULT_OUT, *, quick: bool = False, seed: int = 0,
             pretrain_steps: int | None = None, finetune_steps: int | None = None,
             finetune_lr: float = 1e-3, progress: bool = True, verbose: bool = True) -> dict:
    """Run the demo; returns the content of ``results.json``: ``table`` (per arm: general and
    task answer loss/accuracy), ``clipped_steps`` per arm, ``scores_by_group``, ``seconds``."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastweight.cli import CommandError
    from fastweight.cli import main as cli
    from fastweight.runtime import show_progress
    from fastweight.scoring import read_scores
    from fastweight.training import TrainConfig, train

    started = time.perf_counter()
    progress = show_progress(progress)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    out_path = Path(out)
    work = out_path / "work"
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
                            progress=progress, weight_decay=0.01, initial_eval=False))
    base = pre["final_dir"]

    # 3. the scoring pass, through the CLI code path
    scores_path = work / "scores.safetensors"
    argv = ["score", "--model", base, "--data", task, "--out", str(scores_path), "--device", "cpu"]
    if not progress:
        argv.append("--quiet")
    if cli(argv) != 0:
        raise CommandError("the demo's `fastweight score` step failed (see the line above)")
    scores = read_scores(scores_path)
    groups = [r["group"] for r in task_rows]
    scores_by_group = {g: {"weight": float(scores["weight"][[i for i, x in enumerate(groups) if x == g]].mean()),
                      "loss": float(scores["loss"][[i for i, x in enumerate(groups) if x == g]].mean())}
                  for g in demo_data.GROUPS}

    # 4. fine-tune once per arm, same budget
    results = {}
    base_model = AutoModelForCausalLM.from_pretrained(base)
    results["pre-trained"] = {"general": _answer_metrics(base_model, tokenizer, general_eval_rows),
                              "task": _answer_metrics(base_model, tokenizer, task_test_rows)}
    for name, (weighting, normalization) in ARMS.items():
        run = train(TrainConfig(
            model=base, data=task, scores=str(scores_path) if weighting == "flow" else None,
            out=str(work / f"ft-{name.replace(' ', '-')}"), weighting=weighting,
            weight_normalization=normalization, lr=finetune_lr, warmup=0.1, steps=finetune_steps,
            batch_tokens=512, seed=seed, general_data=general_eval, eval_data=task_test,
            progress=progress, save_final=False))
        results[name] = {"general": _answer_metrics(run["model"], tokenizer, general_eval_rows),
                         "task": _answer_metrics(run["model"], tokenizer, task_test_rows),
                         "clipped_steps": run["train"]["clipped_steps"],
                         "history": [h for h in run["history"] if "loss_weighted" in h]}
    seconds = time.perf_counter() - started

    table = _format_table(results, scores_by_group, pretrain_steps, finetune_steps, finetune_lr, seconds)
    if verbose:
        print(table)
    (out_path / "results.txt").write_text(table + "\n")
    summary = {"table": {k: {"general": v["general"], "task": v["task"]} for k, v in results.items()},
               "clipped_steps": {k: v["clipped_steps"] for k, v in results.items() if k in ARMS},
               "scores_by_group": scores_by_group, "mean_weight": float(scores["weight"].mean()),
               "seconds": seconds, "seed": seed, "quick": quick,
               "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps}
    (out_path / "results.json").write_text(json.dumps(summary, indent=1))
    _plot(results, out_path / "demo.png")
    return summary


def _format_table(results, scores_by_group, pretrain_steps, finetune_steps, lr, seconds) -> str:
    lines = [f"fastweight demo: {pretrain_steps} pre-training steps, {len(ARMS)} x {finetune_steps} "
             f"fine-tuning steps at lr {lr:g}",
             "",
             "FLOW weights from the pre-trained model (mean per group of the task):",
             *[f"  {g:5s} pre-trained loss {v['loss']:.3f}  weight {v['weight']:.3f}" for g, v in scores_by_group.items()],
             "",
             "answer-token loss / exact-match accuracy"
             " (general = held-out facts of the pre-training corpus: forgetting)",
             f"{'model':15s} {'general':>15s} {'task: all':>15s} "
             + " ".join(f"{'task: ' + g:>15s}" for g in demo_data.GROUPS) + "  clipped steps"]
    for name, r in results.items():
        cells = [f"{r['general']['all']['loss']:6.3f} / {r['general']['all']['acc']:5.1%}"]
        for g in ["all", *demo_data.GROUPS]:
            cells.append(f"{r['task'][g]['loss']:6.3f} / {r['task'][g]['acc']:5.1%}")
        clipped = f"  {r['clipped_steps']:>3d} of {finetune_steps}" if "clipped_steps" in r else ""
        lines.append(f"{name:15s} " + " ".join(f"{c:>15s}" for c in cells) + clipped)
    standard = results["standard"]
    lines.append("")
    for name in ARMS:
        if name == "standard":
            continue
        general_gap = results[name]["general"]["all"]["loss"] - standard["general"]["all"]["loss"]
        task_gap = results[name]["task"]["all"]["loss"] - standard["task"]["all"]["loss"]
        lines.append(f"{name} - standard: general loss {general_gap:+.3f} "
                     f"({'less' if general_gap < 0 else 'more'} forgetting), task loss {task_gap:+.3f} "
                     f"({'better' if task_gap < 0 else 'worse'} on the task)")
    lines += ["FLOW takes smaller steps than standard (its weights' mean is below 1); FLOW mean-norm "
              "has the same average step, so its gap to standard is the reweighting alone.",
              f"total time {seconds:.0f} s. One seed and one budget: rerun with --seed / "
              "--finetune-steps / --lr to see how much the gaps move."]
    return "\n".join(lines)


def _plot(results, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    names = list(results)
    color = {name: f"C{k}" for k, name in enumerate(names)}  # one colour per model in every panel
    for name in ARMS:
        history = results[name]["history"]
        axes[0].plot([x["step"] for x in history], [x["loss_unweighted"] for x in history], label=name,
                     color=color[name])
    axes[0].set_title("fine-tuning loss (unweighted token mean)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    categories = ["general", *demo_data.GROUPS]
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        losses = [results[name]["general"]["all"]["loss"]] + [results[name]["task"][g]["loss"] for g in demo_data.GROUPS]
        accuracies = [results[name]["general"]["all"]["acc"]] + [results[name]["task"][g]["acc"] for g in demo_data.GROUPS]
        xs = [i + k * width for i in range(len(categories))]
        axes[1].bar(xs, losses, width, label=name, color=color[name])
        axes[2].bar(xs, accuracies, width, label=name, color=color[name])
    for axis, title in ((axes[1], "answer loss"), (axes[2], "exact-match accuracy")):
        axis.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(categories))], categories)
        axis.set_title(title)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fastweight demo``."""
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller, faster run: 60 pre-training and 15 fine-tuning steps (tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, model and training")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="pre-training steps (default: 500, or 60 with --quick)")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="fine-tuning steps of each arm (default: 100, or 15 with --quick)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (default: bars when stderr is a terminal)")


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``fastweight demo``."""
    runs = []
    for k in range(args.seeds):
        out = args.out if args.seeds == 1 else str(Path(args.out) / f"seed{args.seed + k}")
        runs.append(run_demo(out, quick=args.quick, seed=args.seed + k, pretrain_steps=args.pretrain_steps,
                             finetune_steps=args.finetune_steps, finetune_lr=args.lr,
                             progress=args.progress))
    if len(runs) > 1:
        print("\nacross seeds (arm - standard):")
        for r in runs:
            table = r["table"]
            gaps = ", ".join(
                f"{name}: general {table[name]['general']['all']['loss'] - table['standard']['general']['all']['loss']:+.3f}"
                f" task {table[name]['task']['all']['loss'] - table['standard']['task']['all']['loss']:+.3f}"
                for name in ARMS if name != "standard")
            print(f"  seed {r['seed']}: {gaps}")
    print(f"\nwrote {args.out}/ (results.txt, results.json, demo.png)")
    return 0

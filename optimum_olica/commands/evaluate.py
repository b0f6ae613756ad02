"""``optimum-cli olica eval MODEL``: perplexity (`optimum_olica.evaluation`) and, with ``--tasks``, zero-shot accuracy
through lm-evaluation-harness (`optimum_olica.zero_shot`, needs ``pip install optimum-olica[eval]``).

The default perplexity text is the bundled held-out one (the beginning of Pride and Prejudice), never part of the
bundled calibration text, so the figure is not measured on calibration data and needs no network. ``--dataset
wikitext2`` gives the paper's protocol (WikiText-2 test split, downloaded).
"""

from __future__ import annotations

import argparse
import json

from .base import OlicaSubcommand, add_model_loading_arguments, load_tokenizer_first, model_loading_kwargs

__all__ = ["OlicaEvalCommand"]


def _task_list(text: str) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("expected comma-separated lm-eval task names such as piqa,arc_easy")
    return tasks


class OlicaEvalCommand(OlicaSubcommand):
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from ..evaluation import HELD_OUT_SOURCE

        parser.add_argument("model", metavar="MODEL", help="Hub id or local folder of the model to evaluate.")
        ppl = parser.add_argument_group("Perplexity (optimum_olica.evaluation)")
        ppl.add_argument(
            "--dataset",
            default=HELD_OUT_SOURCE,
            help=f"Evaluation text: {HELD_OUT_SOURCE!r} (default: the bundled held-out text, disjoint from the "
            "bundled calibration text), 'wikitext2' (test split, the paper's protocol; downloads), a local "
            ".txt/.json/.jsonl/.parquet/.csv file or folder, or a Hub dataset name.",
        )
        ppl.add_argument("--split", default="test", help="Split of a Hub dataset (default: test).")
        ppl.add_argument(
            "--sequence-length", type=int, default=128, help="Window length in tokens; windows do not overlap "
            "(default: 128)."
        )
        ppl.add_argument(
            "--max-tokens", type=int, default=None, help="Score only the first N tokens of the text (default: all)."
        )
        ppl.add_argument(
            "--batch-size", type=int, default=16, help="Sequences per forward pass, perplexity and zero-shot "
            "(default: 16)."
        )
        ppl.add_argument("--no-perplexity", action="store_true", help="Skip perplexity (e.g. with --tasks).")
        zero_shot = parser.add_argument_group("Zero-shot accuracy (lm-evaluation-harness, the [eval] extra)")
        zero_shot.add_argument(
            "--tasks",
            type=_task_list,
            default=None,
            help="Comma-separated lm-eval tasks: austen_cloze (bundled, offline) or lm-eval's own, e.g. "
            "piqa,arc_easy,hellaswag (download their data). Default: none.",
        )
        zero_shot.add_argument(
            "--limit", type=int, default=None, help="Evaluate at most N examples per task, for a quick check "
            "(default: all)."
        )
        zero_shot.add_argument(
            "--num-fewshot", type=int, default=None, help="In-context examples per prompt (default: the task's, "
            "zero for austen_cloze)."
        )
        add_model_loading_arguments(parser)
        output = parser.add_argument_group("Output")
        output.add_argument(
            "--record",
            action="store_true",
            help="Append the results to MODEL/olica_report.json (MODEL must be a local Olica checkpoint), so "
            "`inspect` and the Hub model card show them.",
        )
        output.add_argument("--output-json", default=None, help="Also write the results to this JSON file.")

    def execute(self) -> None:
        args = self.args
        if args.no_perplexity and not args.tasks:
            raise ValueError("Nothing to evaluate: --no-perplexity without --tasks. Drop one of them.")
        # Fail before loading the model (minutes for a large one) when the input cannot work.
        if args.record:
            from ..inspection import OlicaCheckpoint

            OlicaCheckpoint.from_directory(args.model)  # raises if MODEL is not a local Olica checkpoint
        if args.tasks:
            from ..zero_shot import _import_lm_eval

            _import_lm_eval()  # raises LmEvalNotInstalledError, naming the pip command, without the [eval] extra

        import optimum_olica  # noqa: F401  (registers the pruned architectures with the Auto classes)
        from transformers import AutoModelForCausalLM

        loading = model_loading_kwargs(args)
        loading.setdefault("dtype", "auto")
        # The tokenizer first: a missing one fails in seconds, where loading the model takes minutes.
        tokenizer = load_tokenizer_first(args, loading, "the evaluation text")
        model = AutoModelForCausalLM.from_pretrained(args.model, **loading).eval()
        entries = []
        if not args.no_perplexity:
            from ..evaluation import evaluation_token_ids, perplexity

            token_ids = evaluation_token_ids(tokenizer, args.dataset, num_tokens=args.max_tokens, split=args.split)
            value = perplexity(
                model, token_ids, sequence_length=args.sequence_length, batch_size=args.batch_size, progress=True
            )
            scored = (token_ids.numel() // args.sequence_length) * args.sequence_length
            entries.append(
                {"kind": "perplexity", "dataset": args.dataset, "split": args.split, "num_tokens": scored,
                 "sequence_length": args.sequence_length, "value": value}
            )
        if args.tasks:
            from ..zero_shot import evaluate_zero_shot

            results = evaluate_zero_shot(
                model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                num_fewshot=args.num_fewshot,
            )
            entries.extend(_zero_shot_entries(results, args.limit, args.num_fewshot))

        from ..inspection import format_evaluation

        for entry in entries:
            print(format_evaluation(entry))
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as file:
                json.dump({"model": args.model, "evaluations": entries}, file, indent=2, sort_keys=True)
        if args.record:
            from ..inspection import record_evaluation

            print(f"Recorded in {record_evaluation(args.model, entries)}")


def _zero_shot_entries(results: dict, limit: int | None, num_fewshot: int | None) -> list[dict]:
    """``evaluate_zero_shot``'s ``{task: {"acc": .., "acc_stderr": .., "num_samples": ..}}`` -> one report entry per
    task and metric, with its standard error and the number of documents scored."""
    entries = []
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric == "num_samples" or metric.endswith("_stderr"):
                continue
            entry = {"kind": "zero_shot", "task": task, "metric": metric, "limit": limit,
                     "num_fewshot": num_fewshot, "num_samples": metrics.get("num_samples"), "value": value}
            if f"{metric}_stderr" in metrics:
                entry["stderr"] = metrics[f"{metric}_stderr"]
            entries.append(entry)
    return entries

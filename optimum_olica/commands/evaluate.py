"""``optimum-cli olica eval MODEL``: perplexity (`optimum_olica.evaluation`) and, with ``--tasks``, zero-shot accuracy
through lm-evaluation-harness (`optimum_olica.zero_shot`, needs ``pip install optimum-olica[eval]``).

By default perplexity is measured on the three bundled held-out texts: the beginning of Pride and Prejudice (never
part of the bundled calibration text, but its domain) and two out-of-domain texts (legal English, Python source), so a
model that only kept its calibration domain shows it; no network is needed. ``--base-model`` also measures the dense
model on the same token windows and reports each perplexity as a ratio to dense. ``--dataset wikitext2`` gives the
paper's protocol (WikiText-2 test split, downloaded).
"""

from __future__ import annotations

import argparse
import json

from .base import OlicaSubcommand, add_model_loading_arguments, load_tokenizer_first, model_loading_kwargs

__all__ = ["OlicaEvalCommand"]


def _source_list(text: str) -> list[str]:
    sources = [source.strip() for source in text.split(",") if source.strip()]
    if not sources:
        raise argparse.ArgumentTypeError("expected comma-separated evaluation texts such as pride-and-prejudice,licenses")
    return sources


def _task_list(text: str) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("expected comma-separated lm-eval task names such as piqa,arc_easy")
    return tasks


class OlicaEvalCommand(OlicaSubcommand):
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from ..evaluation import DEFAULT_EVALUATION_SOURCES, HELD_OUT_SOURCE

        parser.add_argument("model", metavar="MODEL", help="Hub id or local folder of the model to evaluate.")
        ppl = parser.add_argument_group("Perplexity (optimum_olica.evaluation)")
        ppl.add_argument(
            "--dataset",
            type=_source_list,
            default=list(DEFAULT_EVALUATION_SOURCES),
            help=f"Comma-separated evaluation texts, each scored separately. Default: "
            f"{','.join(DEFAULT_EVALUATION_SOURCES)} (bundled: {HELD_OUT_SOURCE} is disjoint from the bundled "
            "calibration text but in its domain; licenses (legal English) and python-stdlib (Python source) are "
            "out of domain). Also: 'wikitext2' (test split, the paper's protocol; downloads), 'austen' (the "
            "calibration text itself), a local .txt/.json/.jsonl/.parquet/.csv file or folder, or a Hub dataset id.",
        )
        ppl.add_argument(
            "--base-model",
            default=None,
            metavar="MODEL",
            help="The dense model MODEL was pruned from (Hub id or folder), or 'auto' for the base model recorded "
            "in MODEL's olica_report.json: also measured on the same token windows, and each perplexity reported "
            "as a ratio to dense. Default: none (no ratios).",
        )
        ppl.add_argument("--split", default="test", help="Split of a Hub dataset (default: test).")
        ppl.add_argument(
            "--sequence-length", type=int, default=128, help="Window length in tokens; windows do not overlap "
            "(default: 128)."
        )
        ppl.add_argument(
            "--max-tokens", type=int, default=None, help="Score only the first N tokens of each text (default: "
            "all)."
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
        base_model = None
        if not args.no_perplexity:
            from ..evaluation import check_evaluation_source

            for source in args.dataset:
                check_evaluation_source(source)  # a mistyped name fails here, not after loading the model
            base_model = _base_model(args)

        import optimum_olica  # noqa: F401  (registers the pruned architectures with the Auto classes)
        from transformers import AutoModelForCausalLM

        loading = model_loading_kwargs(args)
        loading.setdefault("dtype", "auto")
        # The tokenizer first: a missing one fails in seconds, where loading the model takes minutes.
        tokenizer = load_tokenizer_first(args, loading, "the evaluation text")
        token_ids = {}
        if not args.no_perplexity:
            from ..evaluation import evaluation_token_ids

            # Tokenized before the model loads: a text that is too short or unreadable fails in seconds.
            token_ids = {
                source: evaluation_token_ids(tokenizer, source, num_tokens=args.max_tokens, split=args.split)
                for source in args.dataset
            }
        model = AutoModelForCausalLM.from_pretrained(args.model, **loading).eval()
        entries = []
        values = self._perplexities(model, token_ids)
        if args.tasks:
            from ..zero_shot import evaluate_zero_shot

            results = evaluate_zero_shot(
                model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                num_fewshot=args.num_fewshot,
            )
            entries.extend(_zero_shot_entries(results, args.limit, args.num_fewshot))
        if token_ids:
            dense_values = None
            if base_model is not None:
                vocabulary = model.get_input_embeddings().num_embeddings
                del model  # never two models in memory at once
                dense_values = self._dense_perplexities(base_model, loading, token_ids, vocabulary)
            entries[:0] = _perplexity_entries(args, token_ids, values, dense_values, base_model)

        from ..inspection import format_evaluation

        for entry in entries:
            print(format_evaluation(entry))
        if args.output_json:
            with open(args.output_json, "w", encoding="utf-8") as file:
                json.dump({"model": args.model, "evaluations": entries}, file, indent=2, sort_keys=True)
        if args.record:
            from ..inspection import record_evaluation

            print(f"Recorded in {record_evaluation(args.model, entries)}")


    def _perplexities(self, model, token_ids: dict) -> dict[str, float]:
        from ..evaluation import perplexities

        return perplexities(model, token_ids, sequence_length=self.args.sequence_length,
                            batch_size=self.args.batch_size, progress=True)

    def _dense_perplexities(self, base_model: str, loading: dict, token_ids: dict, vocabulary: int) -> dict:
        """The dense model's perplexities on the very token windows MODEL was scored on (MODEL's tokenizer)."""
        from transformers import AutoModelForCausalLM

        # --revision names a revision of MODEL, not of the base model.
        kwargs = {key: value for key, value in loading.items() if key != "revision"}
        dense = AutoModelForCausalLM.from_pretrained(base_model, **kwargs).eval()
        if dense.get_input_embeddings().num_embeddings != vocabulary:
            raise ValueError(
                f"The base model {base_model!r} has a vocabulary of {dense.get_input_embeddings().num_embeddings} "
                f"tokens, MODEL one of {vocabulary}: it is not the model MODEL was pruned from, so the ratios would "
                "mean nothing. Pass the right --base-model."
            )
        return self._perplexities(dense, token_ids)


def _base_model(args: argparse.Namespace) -> str | None:
    """--base-model, with 'auto' read from MODEL's olica_report.json."""
    if args.base_model != "auto":
        return args.base_model
    from ..inspection import OlicaCheckpoint

    try:
        base_model = OlicaCheckpoint.from_directory(args.model).report.get("base_model")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--base-model auto reads the base model from MODEL's olica_report.json, and MODEL has none ({error}). "
            "Pass --base-model FOLDER_OR_HUB_ID."
        ) from None
    if not base_model:
        raise ValueError(
            f"{args.model}'s olica_report.json records no base model, so --base-model auto cannot find it: pass "
            "--base-model FOLDER_OR_HUB_ID."
        )
    return base_model


def _perplexity_entries(args, token_ids: dict, values: dict, dense_values: dict | None,
                        base_model: str | None) -> list[dict]:
    """One report entry per evaluation text, with the dense perplexity and the ratio to it when measured."""
    from ..evaluation import ratios_to_dense

    ratios = ratios_to_dense(values, dense_values) if dense_values is not None else {}
    entries = []
    for source, ids in token_ids.items():
        scored = (ids.numel() // args.sequence_length) * args.sequence_length
        entry = {"kind": "perplexity", "dataset": source, "split": args.split, "num_tokens": scored,
                 "sequence_length": args.sequence_length, "value": values[source]}
        if source in ratios:
            entry.update(base_model=base_model, dense_value=dense_values[source], ratio_to_dense=ratios[source])
        entries.append(entry)
    return entries


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

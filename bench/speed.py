"""Speed of the pruned models against the dense one (issue 6, part 3).

Two protocols, each in its own results file:

- ``python bench/speed.py`` (``speed.json``): SmolLM2-135M-Instruct (float32, CPU) dense, and pruned by Olica to 20%
  and 33% in this same process (or loaded from folders given with --pruned).
- ``python bench/speed.py --large`` (``speed_large.json``): the random-initialised 1.5B Llama of the memory
  benchmark, pruned by Olica in streaming mode (random calibration ids). Random weights give the same pruned shapes as
  trained ones, and speed depends only on shapes, so this is the decode speed of a pruned 1.5B model. Batch-8 prefill
  is left out (half an hour on 2 cores).

Measured, all models interleaved round by round, medians over the rounds:

- prefill throughput: one forward of batch 1 and batch 8 x 512 tokens, building the KV cache, logits for the last
  position only (what ``generate`` does for the prompt), in tokens/s;
- decode throughput: batch 1, greedy, KV cache, ``min_new_tokens = max_new_tokens = 128`` so every model really
  generates 128 tokens; the time of a 1-token generate (prompt prefill + first token) is subtracted, so the figure is
  127 tokens over the pure decode time;
- the anatomy of a decode step: the time of one token through every ``nn.Linear`` of the model (LM head included),
  run back to back. Linear layers are the part of the step that pruning shrinks; the rest (norms, rotary embeddings,
  cache updates, attention, ``generate``'s loop) costs the same in the dense and the pruned model.

Target: decode speedup >= 0.9 x (dense parameters / pruned parameters). Also the KV-cache bytes per token, computed
from the configs (keys keep ``head_dim``, values shrink to each layer's ``value_head_dim``) and checked against the
tensors of a real ``DynamicCache``.

    python bench/speed.py                                   # prunes with 32 x 128 calibration tokens, 5 rounds
    python bench/speed.py --pruned outputs/olica-20,outputs/olica-33 --ratios 0.2,0.33   # reuse pruned folders
    python bench/speed.py --large                           # the 1.5B shape, 3 rounds (about 40 minutes on 2 cores)
    python bench/speed.py --quick                           # 20% only, 8 x 64 calibration tokens, 2 rounds, 256-token
                                                            # prefill (--large --quick: the 0.1B shape)
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE_DIR,
    LLAMA_1_5B,
    LLAMA_100M,
    ROOT,
    random_llama_checkpoint,
    random_token_ids,
    regenerate_report,
    results_path,
    write_results,
)

DECODE_TOKENS = 128
PROMPT_TOKENS = 32
TARGET_FACTOR = 0.9
EVAL_TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"


def kv_bytes_per_token_from_config(config, element_size: int) -> int:
    """Keys: ``num_key_value_heads * head_dim`` per layer; values: ``num_key_value_heads * value_head_dim``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    value_dims = getattr(config, "value_head_dims", None) or [head_dim] * config.num_hidden_layers
    return sum(config.num_key_value_heads * (head_dim + value_dim) * element_size for value_dim in value_dims)


def kv_bytes_per_token_measured(model, input_ids) -> float:
    """Bytes held by a real DynamicCache after a prefill of ``input_ids`` (batch 1), per token."""
    import torch

    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True, logits_to_keep=1).past_key_values
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total / input_ids.numel()


def time_prefill(model, input_ids) -> float:
    import torch

    with torch.no_grad():
        started = time.perf_counter()
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started


def time_generate(model, prompt, new_tokens: int) -> tuple[float, int]:
    import torch

    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    with torch.no_grad():
        started = time.perf_counter()
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=True, pad_token_id=pad,
        )
        seconds = time.perf_counter() - started
    return seconds, output.shape[1] - prompt.shape[1]


def time_linear_layers(model, repeats: int = 5) -> float:
    """Seconds for one token through every ``nn.Linear`` of ``model`` in module order (the weight-bound part of a
    decode step), the fastest of ``repeats`` passes."""
    import torch
    from torch import nn

    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    parameter = next(model.parameters())
    inputs = [torch.randn(1, 1, linear.in_features, dtype=parameter.dtype, device=parameter.device)
              for linear in linears]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for linear, x in zip(linears, inputs):
                linear(x)
            best = min(best, time.perf_counter() - started)
    return best


def measure(models: dict, prefill_batches: dict, prompt, rounds: int) -> dict:
    """Interleaved rounds over ``models``: prefill tokens/s per batch, decode tokens/s, linear-layer seconds."""
    for model in models.values():  # warm-up: first-call allocations and lazy initialisation are not measured
        time_prefill(model, prompt)
        time_generate(model, prompt, 2)
    keys = [f"prefill_b{size}" for size in prefill_batches] + ["decode", "linear_s"]
    samples = {name: {key: [] for key in keys} for name in models}
    for round_idx in range(rounds):
        for name, model in models.items():
            for size, batch in prefill_batches.items():
                samples[name][f"prefill_b{size}"].append(batch.numel() / time_prefill(model, batch))
            first_s, _ = time_generate(model, prompt, 1)
            total_s, generated = time_generate(model, prompt, DECODE_TOKENS)
            if generated != DECODE_TOKENS:
                raise RuntimeError(f"{name} generated {generated} tokens instead of {DECODE_TOKENS}.")
            samples[name]["decode"].append((DECODE_TOKENS - 1) / max(total_s - first_s, 1e-9))
            samples[name]["linear_s"].append(time_linear_layers(model))
        print(f"round {round_idx + 1}/{rounds} done", flush=True)
    return samples


def summarize(models: dict, samples: dict, kv_probe) -> list[dict]:
    """One row per model: medians, speedups against the first (dense) model, target, KV bytes, decode anatomy."""
    rows = []
    dense_kv = kv_bytes_per_token_from_config(next(iter(models.values())).config, 4)
    for name, model in models.items():
        medians = {key: statistics.median(values) for key, values in samples[name].items()}
        kv_config = kv_bytes_per_token_from_config(model.config, 4)
        kv_measured = kv_bytes_per_token_measured(model, kv_probe)
        if abs(kv_measured - kv_config) > 1e-6 * kv_config:
            raise RuntimeError(f"{name}: the DynamicCache holds {kv_measured:.1f} bytes per token, the config says "
                               f"{kv_config}; the cache-size formula or the model is wrong.")
        step_ms = 1000 / medians["decode"]
        row = {
            "model": name,
            "parameters": model.num_parameters(),
            **{f"{key}_tokens_per_s": value for key, value in medians.items() if key.startswith("prefill")},
            "decode_tokens_per_s": medians["decode"],
            "decode_ms_per_token": step_ms,
            "linear_ms_per_token": 1000 * medians["linear_s"],
            "samples": samples[name],
            "kv_bytes_per_token_config": kv_config,
            "kv_bytes_per_token_measured": kv_measured,
            "kv_fraction_of_dense": kv_config / dense_kv,
        }
        row["other_ms_per_token"] = step_ms - row["linear_ms_per_token"]
        if rows:
            dense = rows[0]
            row["params_ratio"] = dense["parameters"] / row["parameters"]
            row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            row["decode_target_speedup"] = TARGET_FACTOR * row["params_ratio"]
            row["decode_speedup_over_target"] = row["decode_speedup"] / row["decode_target_speedup"]
            row["linear_speedup"] = dense["linear_ms_per_token"] / row["linear_ms_per_token"]
            for key in medians:
                if key.startswith("prefill"):
                    row[f"{key}_speedup"] = row[f"{key}_tokens_per_s"] / dense[f"{key}_tokens_per_s"]
        rows.append(row)
        prefill = ", ".join(f"{key.replace('_', ' ')} {value:.0f} tok/s" for key, value in medians.items()
                            if key.startswith("prefill"))
        print(f"{name}: {row['parameters']:,} params, {prefill}, decode {row['decode_tokens_per_s']:.2f} tok/s "
              f"({step_ms:.1f} ms/token, linear layers {row['linear_ms_per_token']:.1f} ms), KV {kv_config} B/token",
              flush=True)
    return rows


def smollm2_models(args, ratios: list[float], parser) -> tuple[dict, str, "object"]:
    """Dense SmolLM2 and its pruned models (pruned here or loaded), and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_olica  # noqa: F401  (registers the pruned architectures for --pruned folders)
    from optimum_olica import OlicaConfig, prune_model
    from optimum_olica.data import get_calibration_dataset
    from optimum_olica.default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load_dense():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    models = {"dense": load_dense()}
    if args.pruned:
        folders = args.pruned.split(",")
        if len(folders) != len(ratios):
            parser.error(f"--pruned names {len(folders)} folders for {len(ratios)} ratios ({args.ratios}).")
        for ratio, folder in zip(ratios, folders):
            models[f"olica {100 * ratio:.0f}%"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return models, f"pruned folders {args.pruned}", tokenizer
    calibration = get_calibration_dataset(tokenizer, "austen", args.num_samples, args.sequence_length, seed=0)
    for ratio in ratios:
        config = OlicaConfig(ratio=ratio, num_samples=args.num_samples, sequence_length=args.sequence_length)
        started = time.perf_counter()
        result = prune_model(load_dense(), config, calibration, progress=False, device="cpu")
        models[f"olica {100 * ratio:.0f}%"] = result.model.eval()
        print(f"pruned to {100 * ratio:.0f}% in {time.perf_counter() - started:.0f} s", flush=True)
    note = f"pruned here with {args.num_samples} x {args.sequence_length} Austen calibration tokens, seed 0"
    return models, note, tokenizer


def large_models(args, ratios: list[float], shape) -> tuple[dict, str]:
    """The random Llama checkpoint and its Olica-pruned versions (pruned in streaming mode, saved to the cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_olica import OlicaConfig, OlicaPruner

    checkpoint = random_llama_checkpoint(shape, "float32")
    ids = random_token_ids(args.num_samples, args.sequence_length, shape.vocab_size)
    folders = []
    for ratio in ratios:
        folder = CACHE_DIR / "speed-run" / f"{checkpoint.name}-olica-{100 * ratio:.0f}"
        started = time.perf_counter()
        pruner = OlicaPruner.from_pretrained(str(checkpoint), streaming=True)
        config = OlicaConfig(ratio=ratio, num_samples=args.num_samples, sequence_length=args.sequence_length)
        pruner.prune(config, calibration_dataset=ids, save_directory=folder, overwrite=True, progress=False,
                     device="cpu")
        folders.append(folder)
        del pruner
        gc.collect()
        print(f"pruned to {100 * ratio:.0f}% in {time.perf_counter() - started:.0f} s (streaming)", flush=True)
    models = {"dense": AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()}
    for ratio, folder in zip(ratios, folders):
        models[f"olica {100 * ratio:.0f}%"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        # Loaded into memory: the cached folder (GBs) is no longer needed.
        shutil.rmtree(folder, ignore_errors=True)
    note = (f"pruned here in streaming mode with {args.num_samples} x {args.sequence_length} random token ids "
            "(random weights give the same pruned shapes as trained ones)")
    return models, note


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20%% only, small calibration, 2 rounds, 256-token prefill")
    parser.add_argument("--large", action="store_true",
                        help="the random 1.5B Llama (quick: 0.1B) instead of SmolLM2; writes speed_large.json")
    parser.add_argument("--ratios", default=None, help="pruning ratios (default 0.2,0.33; quick 0.2)")
    parser.add_argument("--pruned", default=None, help="comma-separated pruned folders, one per ratio (skip pruning)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, large 3; quick 2)")
    parser.add_argument("--prefill-length", type=int, default=None, help="tokens per prefill sequence (default 512)")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 32, large 16; "
                                                                       "quick 8)")
    parser.add_argument("--sequence-length", type=int, default=None, help="calibration length (default 128; quick 64)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    args = parser.parse_args(argv)
    if args.large and args.pruned:
        parser.error("--pruned names SmolLM2 folders; --large prunes its own random checkpoint.")
    args.rounds = args.rounds or (2 if args.quick else 3 if args.large else 5)
    prefill_length = args.prefill_length or (256 if args.quick else 512)
    args.num_samples = args.num_samples or (8 if args.quick else 16 if args.large else 32)
    args.sequence_length = args.sequence_length or (64 if args.quick else 128)
    args.ratios = args.ratios or ("0.2" if args.quick else "0.2,0.33")
    ratios = [float(r) for r in args.ratios.split(",")]

    import torch

    from optimum_olica.data import tokenize_for_perplexity

    if args.large:
        shape = LLAMA_100M if args.quick else LLAMA_1_5B
        models, note = large_models(args, ratios, shape)
        text_ids = random_token_ids(8, prefill_length, shape.vocab_size, seed=1)
        batches = {1: text_ids[:1]}
        model_name = f"random-initialised Llama, {shape.num_parameters() / 1e9:.2f}B parameters (float32, CPU)"
        prefill_note = f"batch 1 x {prefill_length} random token ids, cache built, last logits only (no batch 8)"
        prompt_note = "random"
    else:
        models, note, tokenizer = smollm2_models(args, ratios, parser)
        text_ids = tokenize_for_perplexity(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), 8 * prefill_length)
        text_ids = text_ids.reshape(8, prefill_length)
        batches = {1: text_ids[:1], 8: text_ids}
        model_name = "SmolLM2-135M-Instruct (float32, CPU)"
        prefill_note = f"batch 1 and 8 x {prefill_length} tokens of Pride and Prejudice, cache built, last logits only"
        prompt_note = "Pride and Prejudice"
    prompt = text_ids[:1, :PROMPT_TOKENS]

    samples = measure(models, batches, prompt, args.rounds)
    rows = summarize(models, samples, text_ids[:1, :64])
    results = {
        "protocol": {
            "model": model_name,
            "pruned_models": note,
            "prefill": prefill_note,
            "decode": f"batch 1, {PROMPT_TOKENS}-token {prompt_note} prompt, greedy, KV cache, {DECODE_TOKENS} new "
                      "tokens forced (min_new_tokens); time of a 1-token generate subtracted",
            "linear_layers": "one token through every nn.Linear of the model (LM head included) back to back, the "
                             "fastest of 5 passes per round",
            "rounds": args.rounds,
            "statistic": "median over interleaved rounds",
        },
        "target_factor": TARGET_FACTOR,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    write_results(results_path("speed_large" if args.large else "speed", args.quick), results, "speed.py", argv,
                  args.quick)
    if not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()

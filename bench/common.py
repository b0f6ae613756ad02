"""What every benchmark script shares: where results go, the record of the machine and the command, and the
random-initialised Llama checkpoints of the memory and GPU benchmarks (written shard by shard, never whole in RAM).

Every results JSON holds ``environment`` (CPU model, cores, RAM, GPU, versions), ``command`` (the exact command
line), ``date`` (UTC) and ``quick`` (whether it is a smoke-scale run, whose files end in ``_quick.json``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
# Generated checkpoints (GBs) live outside the repository; OLICA_BENCH_CACHE moves them.
CACHE_DIR = Path(os.environ.get("OLICA_BENCH_CACHE", Path.home() / ".cache" / "optimum_olica" / "bench"))


def results_path(name: str, quick: bool) -> Path:
    """``bench/results/<name>.json``, or ``<name>_quick.json`` for a smoke run (never overwrites the full one)."""
    return RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_commit() -> str | None:
    """The repository's commit (with ``+dirty`` when tracked files outside bench/results differ from it), or None
    outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Results files are written by the benchmarks themselves: only code and docs make a run "dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def environment() -> dict:
    """The machine and the software versions, for the results JSON."""
    import torch
    import transformers

    from optimum_olica import __version__

    gpu = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gpu = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
               "cuda": torch.version.cuda}
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optimum_olica": __version__,
        "commit": git_commit(),
    }


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    arguments = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"bench/{script}", *arguments])


def chosen_variants(parser, text: str, known) -> list[str]:
    """The comma-separated variant names of ``text``; an unknown one is a usage error naming the choices."""
    variants = text.split(",")
    unknown = [name for name in variants if name not in known]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(known)}")
    return variants


def write_results(path: Path, results: dict, script: str, argv: list[str] | None, quick: bool) -> dict:
    """Add the run record (environment, command, date) and write ``results`` as JSON, atomically."""
    record = {
        "command": command_line(script, argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "environment": environment(),
        **results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(record, indent=2) + "\n")
    staging.replace(path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return record


def regenerate_report(quick: bool) -> None:
    """Rewrite docs/benchmarks.md (or, for quick runs, bench/results/benchmarks_quick.md) from the JSON files."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report

    report.main(["--quick"] if quick else [])


class Stopwatch:
    """``with Stopwatch() as watch: ...``; then ``watch.seconds``."""

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        return False


# ---- random-initialised Llama checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-architecture model (what config.json needs, nothing trained)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        return {
            "input_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (d, d),
            "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, d),
            "post_attention_layernorm.weight": (d,),
            "mlp.gate_proj.weight": (self.intermediate_size, d),
            "mlp.up_proj.weight": (self.intermediate_size, d),
            "mlp.down_proj.weight": (d, self.intermediate_size),
        }

    def num_parameters(self) -> int:
        layer = sum(_numel(shape) for shape in self.layer_tensor_shapes().values())
        embeddings = self.vocab_size * self.hidden_size
        return self.num_hidden_layers * layer + embeddings * (1 if self.tie_word_embeddings else 2) + self.hidden_size


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# About 1.48B parameters (5.9 GB in float32): TinyLlama's widths with more layers and 8 KV heads.
LLAMA_1_5B = LlamaShape(hidden_size=2048, num_hidden_layers=30, intermediate_size=5632, num_attention_heads=32,
                        num_key_value_heads=8)
# About 0.1B parameters (0.4 GB in float32), for quick runs: per-layer decompositions grow with the cube of the
# widths, so a 0.3B model (width 1024) already takes several minutes per pass on 2 cores.
LLAMA_100M = LlamaShape(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                        num_key_value_heads=4, vocab_size=16000)
# Llama-2-7B: 6.74B parameters, MHA (32 KV heads), untied head.
LLAMA_2_7B = LlamaShape(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                        num_key_value_heads=32)
# The same shape family scaled down (a CPU rehearsal of the GPU benchmark's code path).
LLAMA_2_TINY = LlamaShape(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=2048)


def random_llama_checkpoint(shape: LlamaShape, dtype_name: str, *, seed: int = 0, device: str = "cpu",
                            directory: Path | None = None) -> Path:
    """A random-initialised Llama checkpoint of ``shape`` on disk (built once, then reused from the cache).

    Weights are drawn N(0, 0.02) (norm weights 1) one tensor at a time and written one decoder layer per safetensors
    shard, so at most one layer is ever in memory. ``device="cuda"`` draws them on the GPU (much faster for 7B).
    A ``.complete`` marker is written last, so an interrupted build is redone rather than reused.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dtype = getattr(torch, dtype_name)
    name = (f"llama-h{shape.hidden_size}-l{shape.num_hidden_layers}-i{shape.intermediate_size}-"
            f"a{shape.num_attention_heads}-kv{shape.num_key_value_heads}-v{shape.vocab_size}-{dtype_name}-s{seed}")
    directory = Path(directory) if directory is not None else CACHE_DIR / name
    marker = directory / ".complete"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device)

    def draw(tensor_shape: tuple[int, ...], key: str) -> "torch.Tensor":
        if key.endswith("norm.weight"):
            return torch.ones(tensor_shape, dtype=dtype)
        tensor = torch.empty(tensor_shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
        return tensor.cpu()

    num_shards = shape.num_hidden_layers + 1
    weight_map, total_size = {}, 0

    def write_shard(index: int, tensors: dict) -> None:
        nonlocal total_size
        file_name = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        weight_map.update({key: file_name for key in tensors})
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())

    for layer_idx in range(shape.num_hidden_layers):
        generator.manual_seed(seed * 1_000_003 + layer_idx)
        tensors = {f"model.layers.{layer_idx}.{key}": draw(tensor_shape, key)
                   for key, tensor_shape in shape.layer_tensor_shapes().items()}
        write_shard(layer_idx, tensors)
        del tensors
    generator.manual_seed(seed * 1_000_003 + shape.num_hidden_layers)
    rest = {
        "model.embed_tokens.weight": draw((shape.vocab_size, shape.hidden_size), "embed"),
        "model.norm.weight": draw((shape.hidden_size,), "model.norm.weight"),
    }
    if not shape.tie_word_embeddings:
        rest["lm_head.weight"] = draw((shape.vocab_size, shape.hidden_size), "lm_head")
    write_shard(shape.num_hidden_layers, rest)
    del rest
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_word_embeddings, initializer_range=0.02, bos_token_id=1, eos_token_id=2,
        dtype=dtype_name,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    (directory / "shape.json").write_text(json.dumps(asdict(shape), indent=2) + "\n")
    marker.write_text("")
    return directory


def checkpoint_bytes(directory: Path) -> int:
    """Size on disk of a checkpoint's safetensors files (the denominator of the memory ratios)."""
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def evict_from_page_cache(directory: Path) -> bool:
    """Ask the kernel to drop a checkpoint's files from the page cache, so a timed run reads them from disk.

    ``posix_fadvise(DONTNEED)`` needs no privileges and drops clean pages; returns False where it is unavailable.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in Path(directory).glob("*.safetensors"):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())  # dirty pages (a freshly built checkpoint) cannot be dropped until written
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def random_token_ids(num_samples: int, sequence_length: int, vocab_size: int, seed: int = 0):
    """Calibration token ids for the random models (they have no tokenizer; the ids are what the pruner takes)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Ids 0-2 are the special tokens of the generated configs.
    return torch.randint(3, vocab_size, (num_samples, sequence_length), generator=generator)


def olica_layer_settings(plan_config, config) -> dict:
    """The keyword arguments an ``OlicaLayerPruner`` (or a bench subclass of it) takes from the recipe ``config``,
    as a ``layer_algorithm`` of ``prune_model`` receives them."""
    import torch

    return {"calibration_rank": config.calibration_rank_for(plan_config.hidden_size),
            "ridge_strength": config.ridge_strength, "refit_damping": config.refit_damping,
            "statistics_dtype": getattr(torch, config.statistics_dtype),
            "value_decomposition": config.value_decomposition, "skip_layers": tuple(config.skip_layers),
            "qk_covariance_shrinkage": config.qk_covariance_shrinkage,
            "value_covariance_shrinkage": config.value_covariance_shrinkage,
            "qk_score_weighting": config.qk_score_weighting}


def forward_in_batches(model, input_ids, batch_size: int, handles=()) -> None:
    """One forward pass of ``model`` over ``input_ids``, ``batch_size`` sequences at a time (no KV cache, no grad);
    the hook ``handles`` the caller registered for it are removed afterwards, whatever happens."""
    import torch

    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def dense_forward_seconds(model, input_ids, batch_size: int) -> float:
    """One forward pass over the calibration set, batched as the pipeline batches it (no KV cache)."""
    started = time.perf_counter()
    forward_in_batches(model, input_ids, batch_size)
    return time.perf_counter() - started

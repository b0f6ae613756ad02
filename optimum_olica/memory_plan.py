"""What a pruning run will hold in memory, write to disk and take, computed from the model's config alone.

``plan_memory(model_config, olica_config)`` reads no weight: every figure is a pure function of the config's shapes,
the recipe and the calibration token count, following what the pipeline really keeps alive in each phase
(``pipeline.run_sequential`` and ``olica.OlicaLayerPruner``):

- capture: the calibration activations of the first layer (``capture_layer_inputs``);
- load: one dense layer on the compute device (streaming, or a model held elsewhere);
- statistics: the dense pass, its moments and the dense outputs the refits need later;
- decomposition: the float64 copies of ``prune`` (Q/K SVDs, V/O rotation, FFN scores) and the pruned layer;
- o_proj refit: the attention sub-block's features pass on the pruned layer (its values, kept for the outputs pass),
  two folds of ``Z^T Z`` / ``Z^T Y`` and their solves;
- propagation: the attention sub-block's outputs and the MLP sub-block's features pass, the FFN activations (and,
  for a branch, the FFN inputs and targets) kept for the MLP's fit, and the FFN-wide folds;
- down_proj refit: the cross-validated Cholesky solves of the MLP's fit (and a branch's fit), then its outputs;
- saving: each pruned layer stored (moved home, or written to its own shard when streaming);
- final write: the pruned model assembled and written (streaming: the non-layer tensors, index and config).

Each phase's figure is the peak of live tensor storage during that phase, the tensors held from earlier phases
included, for the layer with the widest pruned dimensions. Device and host follow where the code puts each tensor:
the refit folds and a calibration branch's sums are summed on the host (the device computes each batch's products
one Gram block at a time), the solves run on the device in one float64 workspace, the pruned FFN's activations kept
for the ``down_proj`` refit wait on the host when the compute device is an accelerator, and the other activations kept
between passes are on the device unless ``offload_activations`` puts them on the host. Memory the libraries allocate
outside tensors (LAPACK workspaces, the allocator's caching and fragmentation, safetensors' serialisation buffers)
is not counted: budget a margin on top. The time is an estimate from floating-point operation counts and throughputs measured on one CPU
class (see ``CPU_THROUGHPUT``), not a measurement; no time is estimated for accelerators (none was measured).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from . import pruner
from .allocation import plan_dimensions
from .conversion import olica_config_from
from .configuration import OlicaConfig
from .olica import REFIT_DAMPING_CANDIDATES
from .pipeline import SubBlock
from .olica_math import _COPY_CHUNK_ELEMENTS, _SCORE_BLOCK_ELEMENTS

# choose_refit_damping's sketch of the output channels.
_REFIT_PROBES = 64

# Effective throughputs (operations per second, for the operation counts of `_phase_flops`) fitted to the phase
# timings of one prune_model run (a 2-layer Llama of hidden size 1,024 and FFN 2,816, 4,096 calibration tokens) on
# the CI machine: 2 cores of a shared x86-64 server, torch 2.13 CPU build. They set the time estimate for that CPU
# class only; other CPUs differ several-fold, and the counts leave out memory-bound work.
CPU_THROUGHPUT = {"gemm_float32": 170e9, "gemm_float64": 80e9, "cholesky_float64": 40e9, "svd_float64": 30e9}
_DISK_BYTES_PER_S = 500e6  # an assumed SSD rate for reading layers and writing shards, not measured here

PHASES = (
    "capture", "load", "statistics", "decomposition", "o_proj refit", "propagation", "down_proj refit", "saving",
    "final write",
)


# Where each phase runs in the code, for measuring the plan against a real run (tests/test_memory_plan.py,
# bench/gpu.py): (module, attribute path, phase, kind, sub-block). Kind "enter": only entering the context manager is
# the phase (a layer source's block spans the others); "context": the whole block; None: the call. A sub-block
# restricts a ``SubBlockPasses`` method to its calls for that sub-block.
PHASE_STEPS = (
    ("pruner", "capture_layer_inputs", "capture", None, None),
    ("sources", "ModelLayerSource.dense_layer", "load", "enter", None),
    ("sources", "SafetensorsLayerSource.dense_layer", "load", "enter", None),
    ("olica", "OlicaLayerPruner.observe_dense", "statistics", "context", None),
    ("olica", "OlicaLayerPruner.prune", "decomposition", None, None),
    ("pipeline", "SubBlockPasses.features", "o_proj refit", None, "attention"),
    ("pipeline", "SubBlockPasses.fit", "o_proj refit", None, "attention"),
    ("pipeline", "SubBlockPasses.outputs", "propagation", None, "attention"),
    ("pipeline", "SubBlockPasses.features", "propagation", None, "mlp"),
    ("pipeline", "SubBlockPasses.fit", "down_proj refit", None, "mlp"),
    ("pipeline", "SubBlockPasses.outputs", "down_proj refit", None, "mlp"),
    ("sinks", "ModelSink.store", "saving", None, None),
    ("sinks", "ShardSink.store", "saving", None, None),
    ("sinks", "ModelSink.finish", "final write", None, None),
    ("sinks", "ShardSink.finish", "final write", None, None),
)


@contextmanager
def phases_observed(in_phase: Callable[[str], AbstractContextManager]) -> Iterator[None]:
    """Within the block, every step of ``PHASE_STEPS`` runs inside ``in_phase(<its phase>)``."""
    import importlib

    by_target: dict[tuple[str, str], list[tuple[str, str | None, str | None]]] = {}
    for module, path, phase, kind, block in PHASE_STEPS:
        by_target.setdefault((module, path), []).append((phase, kind, block))
    undo = []
    try:
        for (module, path), steps in by_target.items():
            owner = importlib.import_module(f"optimum_olica.{module}")
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, attribute)
            setattr(owner, attribute, _in_phase(original, steps, in_phase))
            undo.append((owner, attribute, original))
        yield
    finally:
        for owner, attribute, original in reversed(undo):
            setattr(owner, attribute, original)


def _in_phase(original, steps, in_phase):
    """``original`` wrapped so that it runs inside the phase of its step (chosen by the sub-block argument)."""
    kind = steps[0][1]

    def phase_of(args) -> str:
        block = next((arg.name for arg in args if isinstance(arg, SubBlock)), None)
        return next(phase for phase, _, step_block in steps if step_block in (None, block))

    if kind == "enter":
        @contextmanager
        def wrapped(*args, **kwargs):
            with ExitStack() as stack:
                with in_phase(phase_of(args)):
                    value = stack.enter_context(original(*args, **kwargs))
                yield value
    elif kind == "context":
        @contextmanager
        def wrapped(*args, **kwargs):
            with in_phase(phase_of(args)), original(*args, **kwargs) as value:
                yield value
    else:
        def wrapped(*args, **kwargs):
            with in_phase(phase_of(args)):
                return original(*args, **kwargs)
    return functools.wraps(original)(wrapped)


@dataclass(frozen=True)
class PhaseMemory:
    """One phase of the pipeline: peak bytes on the compute device and on the host, disk written, time estimate.

    ``device_bytes`` and ``host_bytes`` are disjoint, each the peak of its side (they may fall at different moments
    of the phase). ``total_bytes`` is the peak of both together at one moment: on a CPU run both are the same RAM
    and that is the phase's peak. ``seconds`` is None where no throughput is known (accelerators).
    """

    name: str
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    seconds: float | None
    combined_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes if self.combined_bytes is None else self.combined_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of ``plan_memory``: one ``PhaseMemory`` per phase and what it was computed for."""

    model_type: str
    device: str
    dtype: torch.dtype
    streaming: bool
    num_tokens: int
    parameters_before: int
    parameters_after: int
    phases: tuple[PhaseMemory, ...]
    notes: tuple[str, ...] = field(default=())

    def phase(self, name: str) -> PhaseMemory:
        return next(phase for phase in self.phases if phase.name == name)

    @property
    def peak_device_bytes(self) -> int:
        return max(phase.device_bytes for phase in self.phases)

    @property
    def peak_host_bytes(self) -> int:
        return max(phase.host_bytes for phase in self.phases)

    @property
    def disk_bytes(self) -> int:
        return sum(phase.disk_bytes for phase in self.phases)

    @property
    def seconds(self) -> float | None:
        times = [phase.seconds for phase in self.phases]
        return None if any(time is None for time in times) else sum(times)

    def __str__(self) -> str:
        mode = "streaming" if self.streaming else "loaded model"
        lines = [
            f"Memory plan: {self.model_type}, {self.parameters_before:,} -> {self.parameters_after:,} parameters, "
            f"{str(self.dtype).removeprefix('torch.')}, {mode}, compute device {self.device}, "
            f"{self.num_tokens:,} calibration tokens",
            f"{'phase':<16} {'device':>10} {'host':>10} {'disk':>10} {'time':>10}",
        ]
        for phase in self.phases:
            lines.append(
                f"{phase.name:<16} {_size(phase.device_bytes):>10} {_size(phase.host_bytes):>10} "
                f"{_size(phase.disk_bytes):>10} {_duration(phase.seconds):>10}"
            )
        lines.append(
            f"{'peak / total':<16} {_size(self.peak_device_bytes):>10} {_size(self.peak_host_bytes):>10} "
            f"{_size(self.disk_bytes):>10} {_duration(self.seconds):>10}"
        )
        lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


@dataclass(frozen=True)
class _Shapes:
    """The sizes the pipeline's tensors are made of (one layer: the widest pruned one)."""

    hidden: int
    ffn: int  # dense intermediate size
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_layers: int
    pruned_ffn: int
    value_dim: int  # pruned value channels per head
    query_rank: int | None
    key_rank: int | None
    calibration_rank: int
    dense_layer_parameters: int
    pruned_layer_parameters: int
    parameters_before: int
    parameters_after: int
    non_layer_parameters: int  # embeddings, final norm, untied LM head
    num_tokens: int
    batch_tokens: int
    sequence_length: int
    num_batches: int
    sliding_window: bool
    weight_bytes: int  # bytes per weight / activation element (the model's dtype)
    statistics_bytes: int  # bytes per accumulated statistic


def _shapes(model_config, recipe: OlicaConfig, dtype: torch.dtype) -> _Shapes:
    """The dimensions ``prune_model`` will use, from the same allocation it runs."""
    full = olica_config_from(model_config)
    calibration_rank = recipe.calibration_rank_for(full.hidden_size)
    dimensions = plan_dimensions(
        full, recipe.ratio, qk_ratio=recipe.qk_ratio, vo_ratio=recipe.vo_ratio, ffn_ratio=recipe.ffn_ratio,
        calibration_rank=calibration_rank, num_calibrated_layers=recipe.num_calibrated_layers,
        skip_layers=tuple(recipe.skip_layers), dimension_multiple=recipe.dimension_multiple,
    )
    lists = dimensions.per_layer_lists()
    pruned = olica_config_from(model_config, **lists)
    layers = range(full.num_hidden_layers)
    widest = max(layers, key=lambda layer: (pruned.layer_parameter_count(layer), layer not in recipe.skip_layers))
    if recipe.layer_allocation == "adaptive":
        # The data chooses each layer's FFN width, up to the whole FFN: plan the widest layer at that bound.
        widths = [full.intermediate_size if layer == widest else width
                  for layer, width in enumerate(lists["intermediate_sizes"])]
        lists = {**lists, "intermediate_sizes": widths}
        widest_layer = olica_config_from(model_config, **lists)
    else:
        widest_layer = pruned
    head_dim = getattr(full, "head_dim", None) or full.hidden_size // full.num_attention_heads
    sequence_length = recipe.sequence_length
    batch_sequences = min(pruner.calibration_batch_size(sequence_length), recipe.num_samples)
    layer_total = sum(full.layer_parameter_count(layer) for layer in layers)
    return _Shapes(
        hidden=full.hidden_size, ffn=full.intermediate_size, heads=full.num_attention_heads,
        kv_heads=full.num_key_value_heads, head_dim=head_dim, vocab=full.vocab_size, num_layers=len(layers),
        pruned_ffn=lists["intermediate_sizes"][widest], value_dim=lists["value_head_dims"][widest],
        query_rank=lists["query_ranks"][widest], key_rank=lists["key_ranks"][widest],
        calibration_rank=calibration_rank,
        dense_layer_parameters=full.layer_parameter_count(widest),
        pruned_layer_parameters=widest_layer.layer_parameter_count(widest),
        parameters_before=dimensions.parameters_before, parameters_after=pruned.count_parameters(),
        non_layer_parameters=dimensions.parameters_before - layer_total,
        num_tokens=recipe.num_samples * sequence_length, batch_tokens=batch_sequences * sequence_length,
        sequence_length=sequence_length, num_batches=math.ceil(recipe.num_samples / batch_sequences),
        sliding_window=bool(getattr(full, "sliding_window", None)), weight_bytes=dtype.itemsize,
        statistics_bytes=getattr(torch, recipe.statistics_dtype).itemsize,
    )


@dataclass(frozen=True)
class _Run:
    """Where things live in this run: what ``prune_model`` decides from the recipe and the device."""

    shapes: _Shapes
    streaming: bool
    on_cpu: bool  # compute device is the host: device and host figures are the same memory
    offload: bool  # activations stored on the host between passes
    refit: bool
    calibrated: bool
    trajectory: bool  # the dense model's own activations carried beside the pruned ones (trajectory_weight > 0)
    attention_gram: bool  # Q/K factored under the attention input's X^T X (qk_covariance_shrinkage < 1)


def _layer_state(run: _Run) -> int:
    """The dense layer's bytes on the compute device, when it is a copy (streaming, or the model lives elsewhere)."""
    s = run.shapes
    return s.dense_layer_parameters * s.weight_bytes if run.streaming or not run.on_cpu else 0


def _rotary_bytes(s: _Shapes) -> int:
    """The keyword arguments captured per batch: cos and sin (1, L, head_dim), position ids, and for
    sliding-window models a boolean (L, L) mask."""
    mask = s.sequence_length if s.sliding_window else 0
    return s.num_batches * s.sequence_length * (2 * s.head_dim * s.weight_bytes + 16 + mask)


def _tokens_by_hidden(s: _Shapes, tokens: int) -> int:
    return tokens * s.hidden * s.weight_bytes


def _dense_statistics(s: _Shapes, attention_gram: bool) -> int:
    """StreamingMoments of the attention input (with its X^T X when Q/K weigh correlations), o_proj output, FFN input
    and down_proj input; the value head Gram."""
    gram = s.hidden**2 if attention_gram else 0
    return (6 * s.hidden + 2 * s.ffn + s.heads * s.head_dim**2 + gram) * s.statistics_bytes


def _fold_bytes(s: _Shapes, inputs: int, outputs: int) -> int:
    """Two folds of StreamingMoments(inputs, gram=True, target_dim=outputs)."""
    return 2 * (inputs * inputs + inputs * outputs + 2 * inputs + 2 * outputs) * s.statistics_bytes


def _largest_gram_block(dim: int) -> int:
    """Elements of the largest block ``StreamingMoments`` computes of a batch's ``X^T X`` (``_gram_blocks``)."""
    parts = 4 if dim >= 384 else 2 if dim >= 192 else 1
    return math.ceil(dim / parts) ** 2


def _fold_update(s: _Shapes, inputs: int, outputs: int, on_cpu: bool) -> tuple[int, int]:
    """(compute device, host) transients of one fold update: half a batch of inputs and targets made contiguous and
    cast to float32 on the compute device, then one float32 product at a time (a Gram block, then ``X^T E``), each
    copied to the host sums (on a CPU run the product is added where it is: no copy)."""
    half = s.batch_tokens // 2
    rows = half * (inputs + outputs) * (s.weight_bytes + (4 if s.weight_bytes == 2 else 0))
    product = max(_largest_gram_block(inputs), inputs * outputs) * 4
    return rows + product, 0 if on_cpu else product


def _refit_solve(s: _Shapes, inputs: int, outputs: int, on_cpu: bool) -> list[tuple[int, int]]:
    """The two moments of ``_refit``'s solves as (compute device, host) bytes beyond the folds: one (inputs x inputs)
    float64 workspace, factored in place, with the cross-validation's sketched crosses and candidate fits (on a CPU
    run float32 sums are sketched from a float64 copy of the cross, on the host), then, once the folds are merged
    (one fold's sums released), the final solve's right-hand side (one inputs x outputs float64 matrix, overwritten by
    the solution), built a piece at a time (one float64 piece of the prior, ``olica_math._COPY_CHUNK_ELEMENTS``)."""
    workspace = inputs * inputs * 8
    probes = min(_REFIT_PROBES, outputs)
    choice = (2 * len(REFIT_DAMPING_CANDIDATES) + 4) * inputs * probes * 8
    piece = min(max(1, _COPY_CHUNK_ELEMENTS // outputs) * outputs, inputs * outputs) * 8
    merged = -_fold_bytes(s, inputs, outputs) // 2
    return [
        (workspace + choice, inputs * outputs * 8 if on_cpu and s.statistics_bytes == 4 else 0),
        (workspace + inputs * outputs * 8 + piece, merged),
    ]


def _calibration_fit(s: _Shapes, on_cpu: bool) -> tuple[int, tuple[int, int]]:
    """The linear-calibration branch of the MLP's fit: (its (d x d) moments in host memory, then the larger of one
    batch's residual update (compute device, host) and the fit, which runs on the host where the moments are
    (workspace, solution, its product with the Gram, SVD))."""
    d = s.hidden
    moments = (2 * d * d + 4 * d) * s.statistics_bytes
    batch_device = 3 * s.batch_tokens * d * max(s.weight_bytes, 4) + d * d * 4
    batch_host = 0 if on_cpu else d * d * 4
    return moments, (batch_device, max(batch_host, 5 * d * d * 8))


def _decomposition_transient(s: _Shapes, attention_gram: bool) -> int:
    """The largest float64 working set of ``prune``: the pieces of the new state held so far plus the step's own
    temporaries (SVD of the weighted Q/K weights, V/O rotation, FFN scores, the assembled pruned layer). The FFN
    scores hold a block of gate/up rows in float64 and scaled (``olica_math._SCORE_BLOCK_ELEMENTS``), then one float64
    copy of ``down_proj``. Q/K factored under the input's correlations first build one (hidden x hidden) whitening
    factor, which both factorings then hold."""
    d, q_width, kv_width = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    score_block = min(max(2, _SCORE_BLOCK_ELEMENTS // d), s.ffn) * d
    query = 0 if s.query_rank is None else s.query_rank * (d + q_width) * 8
    key = 0 if s.key_rank is None else s.key_rank * (d + kv_width) * 8
    value_output = (s.kv_heads * s.value_dim * d + d * s.heads * s.value_dim) * 8
    svd = lambda rows: (2 * rows * d + rows * min(rows, d) + min(rows, d) * d) * 8  # noqa: E731 (copy, scaled, U, Vh)
    # Under the input's correlations: the shrunk matrix, its jittered copy and their Cholesky factor, then the factor
    # (shared by Q and K) beside each SVD.
    whitening = d * d * 8 if attention_gram else 0
    steps = (
        3 * whitening,
        whitening + (svd(q_width) if s.query_rank is not None else 0),
        query + whitening + (svd(kv_width) if s.key_rank is not None else 0),
        query + key + 3 * d * q_width * 8 + 2 * kv_width * d * 8,  # rotation: o and v in float64, rotated copies
        query + key + value_output + max(2 * score_block, s.ffn * d) * 8,  # FFN scores
        query + key + value_output + s.pruned_layer_parameters * s.weight_bytes,  # the pruned layer assembled
    )
    return max(steps)


def _phase_moments(run: _Run) -> dict[str, list[tuple[int, int, int]]]:
    """Per phase, the moments that can be its peak, each as (activations stored between passes, compute-device
    working set, host working set). Stored activations live on the host with ``offload_activations``, else on the
    compute device; the refit and branch sums always live on the host (``OlicaLayerPruner._folds``)."""
    s = run.shapes
    w, n, batch = s.weight_bytes, s.num_tokens, s.batch_tokens
    layer = _layer_state(run)
    # Streaming: the previous pruned layer is written, not moved off the device, and stays referenced until the
    # next ``prune`` returns.
    previous_pruned = s.pruned_layer_parameters * w if run.streaming else 0
    pruned = s.pruned_layer_parameters * w
    attention_width = s.heads * s.value_dim
    inputs = _tokens_by_hidden(s, n) + _rotary_bytes(s)
    attention_targets = _tokens_by_hidden(s, n) if run.refit else 0
    layer_targets = _tokens_by_hidden(s, n) if run.refit or run.calibrated else 0
    # Per-batch activations of the dense FFN: gate, up and their product in the model dtype, or the product with
    # its float32 copy and square for the down_proj-input moments, whichever is larger.
    cast = 4 if w == 2 else 0
    dense_ffn = batch * s.ffn * max(3 * w, w + cast + 4) + 2 * _tokens_by_hidden(s, batch)
    attention_pass = batch * (s.heads + 2 * s.kv_heads) * s.head_dim * w + batch * attention_width * w
    # Kept for the MLP's fit: the FFN activations, and for a branch's fit also the FFN inputs and targets. The
    # activations computed on an accelerator wait in host memory (``SubBlockPasses._keep``).
    ffn_activations = n * s.pruned_ffn * w if run.refit or run.calibrated else 0
    ffn_batches = (ffn_activations if run.on_cpu else 0) + (n * 2 * s.hidden * w if run.calibrated else 0)
    host_activations = 0 if run.on_cpu else ffn_activations
    o_folds = _fold_bytes(s, attention_width, s.hidden) if run.refit else 0
    down_folds = _fold_bytes(s, s.pruned_ffn, s.hidden) if run.refit else 0
    o_update = _fold_update(s, attention_width, s.hidden, run.on_cpu)
    down_update = _fold_update(s, s.pruned_ffn, s.hidden, run.on_cpu) if run.refit else (0, 0)
    statistics = _dense_statistics(s, run.attention_gram)
    o_solve = _refit_solve(s, attention_width, s.hidden, run.on_cpu)
    down_solve = _refit_solve(s, s.pruned_ffn, s.hidden, run.on_cpu)

    moments = {
        "load": [(inputs, layer + previous_pruned, 0)],
        "statistics": [(
            inputs + attention_targets + layer_targets - (_tokens_by_hidden(s, batch) if layer_targets else 0),
            layer + previous_pruned + statistics + dense_ffn, 0,
        )],
        "decomposition": [(
            inputs + attention_targets + layer_targets,
            layer + previous_pruned + statistics + _decomposition_transient(s, run.attention_gram), 0,
        )],
        # The attention pass consumes the dense attention outputs as it stores the values; then the solves.
        "o_proj refit": [
            (inputs + attention_targets + layer_targets + batch * attention_width * w,
             layer + pruned + attention_pass + o_update[0], o_folds + o_update[1]),
            *((inputs + layer_targets + n * attention_width * w, layer + pruned + device, o_folds + host)
              for device, host in o_solve),
        ] if run.refit else [(inputs + layer_targets, layer + pruned, 0)],  # without a refit, no attention features are kept
        # The pass consumes the dense layer outputs (and the cached values) as it stores its outputs and the FFN
        # activations: its peak is at the end.
        "propagation": [(
            2 * inputs + ffn_batches + _tokens_by_hidden(s, batch),
            layer + pruned + _tokens_by_hidden(s, batch) + batch * attention_width * w + down_update[0],
            down_folds + down_update[1] + host_activations,
        )],
        "down_proj refit": [
            (2 * inputs + ffn_batches, pruned + device, down_folds + host + host_activations)
            for device, host in down_solve
        ] if run.refit else [(2 * inputs + ffn_batches, pruned, host_activations)],
        # The layer's inputs are released before the store: the next layer's inputs replace them.
        "saving": [(inputs, pruned, 0)],
    }
    if run.calibrated:
        # The branch is fitted after the refit; the merged refit fold (half of down_folds) is still referenced.
        branch_moments, (batch_device, branch_host) = _calibration_fit(s, run.on_cpu)
        moments["down_proj refit"].append((
            2 * inputs + ffn_batches, pruned + batch_device,
            down_folds // 2 + branch_moments + branch_host + host_activations,
        ))
    if not run.on_cpu:
        # The MLP outputs pass: each batch of activations copied back from the host, and its output.
        moments["down_proj refit"].append((
            2 * inputs + ffn_batches, pruned + batch * (s.pruned_ffn + s.hidden) * w,
            (down_folds // 2 if run.refit else 0) + host_activations,
        ))
    # The dense model's own stream, when carried, waits beside the pruned one from the second layer on (the first
    # layer's inputs are the same tensors); the dense pass over it ends with it and the next layer's alive. By then a
    # model held in memory has shrunk by one pruned layer.
    dense_stream = _tokens_by_hidden(s, n) if run.trajectory else 0
    shrunk = 0 if run.streaming else (s.dense_layer_parameters - s.pruned_layer_parameters) * w
    return {name: [(stored + max(0, dense_stream * (2 if name == "statistics" else 1) - shrunk), device, host)
                   for stored, device, host in entries] for name, entries in moments.items()}


def _phase_bytes(run: _Run) -> dict[str, tuple[int, int, int]]:
    """(compute device, host, both at once) peak bytes of each phase."""
    s = run.shapes
    w, n, batch = s.weight_bytes, s.num_tokens, s.batch_tokens
    model = 0 if run.streaming else s.parameters_before * w
    host_fixed = model + n * 8  # the model (unless streamed) and the calibration token ids
    inputs = _tokens_by_hidden(s, n) + _rotary_bytes(s)
    # The embedding output is moved from the host to the storage device (the same tensor when that is the host).
    capture_host = (
        host_fixed + (s.vocab * s.hidden * w if run.streaming else 0)
        + (_tokens_by_hidden(s, batch) if not (run.on_cpu or run.offload) else 0)
        + 4 * s.sequence_length * s.head_dim * 4  # the rotary embedding's float32 intermediates
    )
    capture = (0, capture_host + inputs) if run.offload else (inputs, capture_host)
    result = {"capture": (*capture, sum(capture))}
    for name, moments in _phase_moments(run).items():
        placed = []
        for stored, device, host in moments:
            if run.offload:  # stored on the host; the device holds the batch moved in and its output
                placed.append((device + 2 * _tokens_by_hidden(s, batch), host_fixed + host + stored))
            else:
                placed.append((device + stored, host_fixed + host))
        result[name] = (max(d for d, _ in placed), max(h for _, h in placed), max(d + h for d, h in placed))
    # After the loop only the pruned weights remain: the whole pruned model, or (streaming) the non-layer tensors.
    final_host = n * 8 + (s.non_layer_parameters if run.streaming else s.parameters_after) * w
    result["final write"] = (0, final_host, final_host)
    return result


def _phase_flops(s: _Shapes, run: _Run) -> dict[str, dict[str, float]]:
    """Floating-point operations per phase over all layers, by the kind of throughput that limits them."""
    n, d, layers = s.num_tokens, s.hidden, s.num_layers
    width = s.heads * s.value_dim
    attention_scores = 2 * n * s.sequence_length * s.heads * s.head_dim  # QK^T and PV over a causal window
    q_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
    svd = lambda m, k: 4 * max(m, k) * min(m, k) ** 2 + 8 * min(m, k) ** 3  # noqa: E731
    solves = len(REFIT_DAMPING_CANDIDATES) * 2 + 1 if run.refit else 0
    return {
        "statistics": {"gemm_float32": layers * (
            2 * n * s.dense_layer_parameters + attention_scores + 2 * n * s.heads * s.head_dim**2
            + (2 * n * d * d if run.attention_gram else 0)  # the attention input's X^T X (blocks on and above)
        )},
        "decomposition": {
            "svd_float64": layers * (svd(q_width, d) + svd(kv_width, d) + s.kv_heads * svd(s.head_dim, d)),
            "gemm_float64": layers * (8 * s.ffn * d + (2 * (q_width + kv_width) * d * d if run.attention_gram else 0)),
            **({"cholesky_float64": layers * 2 * d**3 / 3} if run.attention_gram else {}),
        },
        "o_proj refit": {
            "gemm_float32": layers * (
                2 * n * (q_width + 2 * kv_width) * d + attention_scores + 2 * n * width * (width + d)
            ),
            "cholesky_float64": layers * solves * width**3 / 3,
            "gemm_float64": layers * solves * 2 * width**2 * d,
        },
        "propagation": {"gemm_float32": layers * (
            2 * n * (2 * d * s.pruned_ffn + width * d) + (2 * n * s.pruned_ffn * (s.pruned_ffn + d) if run.refit else 0)
        )},
        "down_proj refit": {
            "cholesky_float64": layers * solves * s.pruned_ffn**3 / 3,
            "gemm_float64": layers * solves * 2 * s.pruned_ffn**2 * min(_REFIT_PROBES, d),
            "gemm_float32": layers * 2 * n * s.pruned_ffn * d,
        },
    }


def _phase_disk(s: _Shapes, run: _Run) -> dict[str, tuple[int, int]]:
    """(bytes read, bytes written) per phase: streaming reads each layer from the checkpoint and writes each pruned
    layer; every run writes the pruned checkpoint (the non-layer tensors, and all layers unless streamed)."""
    w = s.weight_bytes
    layers_read = s.num_layers * s.dense_layer_parameters * w if run.streaming else 0
    return {
        "capture": (s.vocab * s.hidden * w if run.streaming else 0, 0),
        "load": (layers_read, 0),
        "saving": (0, (s.parameters_after - s.non_layer_parameters) * w if run.streaming else 0),  # every layer
        "final write": (
            s.non_layer_parameters * w if run.streaming else 0,
            (s.non_layer_parameters if run.streaming else s.parameters_after) * w,
        ),
    }


def plan_memory(
    model_config, olica_config: OlicaConfig | None = None, *, dtype: torch.dtype | str | None = None,
    device: str | None = None, streaming: bool = False, offload_activations: bool = False,
) -> MemoryPlan:
    """The memory, disk and time a pruning run of ``olica_config`` on this model will need, from the config alone.

    Args:
        model_config: the transformers config of the model to prune (``AutoConfig.from_pretrained``; no weights).
        olica_config: the recipe (default ``OlicaConfig()``); its calibration token count, statistics dtype and
            refit settings enter the plan.
        dtype: the dtype the weights are loaded in (default: the config's ``dtype``, else float32).
        device: the compute device type, ``"cuda"`` or ``"cpu"`` (default: ``"cuda"`` when one is available, else
            ``"cpu"``), as ``prune_model`` chooses it. A loaded (not streamed) model is assumed to be on the host,
            each layer copied to the device while it is pruned.
        streaming: a streaming run (``OlicaPruner.from_pretrained(path, streaming=True)``).
        offload_activations: the run's ``offload_activations`` (activations wait on the host between layers).
    """
    recipe = olica_config or OlicaConfig()
    dtype = _weight_dtype(model_config, dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    shapes = _shapes(model_config, recipe, dtype)
    run = _Run(
        shapes, streaming=streaming, on_cpu=device == "cpu", offload=offload_activations,
        refit=recipe.refit_damping is not None, calibrated=shapes.calibration_rank > 0,
        trajectory=recipe.trajectory_weight > 0 and (recipe.refit_damping is not None or shapes.calibration_rank > 0),
        attention_gram=recipe.qk_covariance_shrinkage < 1 and (shapes.query_rank, shapes.key_rank) != (None, None),
    )
    memory, flops, disk = _phase_bytes(run), _phase_flops(shapes, run), _phase_disk(shapes, run)
    phases = []
    for name in PHASES:
        read, written = disk.get(name, (0, 0))
        seconds = None
        if device == "cpu":
            seconds = sum(count / CPU_THROUGHPUT[kind] for kind, count in flops.get(name, {}).items())
            seconds += (read + written) / _DISK_BYTES_PER_S
        device_bytes, host_bytes, combined = memory[name]
        phases.append(PhaseMemory(name, device_bytes, host_bytes, written, seconds, combined_bytes=combined))
    notes = [
        "device/host: peak bytes of live tensors in each phase, tensors kept from earlier phases included"
        + (" (a CPU run: both are the same RAM, add them)" if device == "cpu" else "")
        + "; LAPACK workspaces, allocator caching and file buffers are not counted.",
        "disk: bytes written (the pruned checkpoint" + (", layer by layer" if run.streaming else "") + ").",
        "time: an ESTIMATE from operation counts and the throughputs of optimum_olica.memory_plan.CPU_THROUGHPUT, "
        "fitted to one run on 2 cores of a shared x86-64 server (that CPU class only; others differ several-fold)."
        if device == "cpu" else "time: not estimated for accelerators (no measured throughput).",
    ]
    return MemoryPlan(
        model_type=model_config.model_type, device=device, dtype=dtype, streaming=run.streaming,
        num_tokens=shapes.num_tokens, parameters_before=shapes.parameters_before,
        parameters_after=shapes.parameters_after, phases=tuple(phases), notes=tuple(notes),
    )


def _weight_dtype(model_config, dtype) -> torch.dtype:
    """The dtype the weights will be in: the one asked, else the checkpoint's own (``dtype="auto"``), else float32."""
    for candidate in (dtype, getattr(model_config, "dtype", None)):
        if isinstance(candidate, torch.dtype):
            return candidate
        if isinstance(candidate, str) and candidate != "auto":
            return getattr(torch, candidate.removeprefix("torch."))
    return torch.float32


__all__ = ["CPU_THROUGHPUT", "MemoryPlan", "PHASES", "PHASE_STEPS", "PhaseMemory", "phases_observed", "plan_memory"]

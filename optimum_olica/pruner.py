"""Entry points: ``prune_model`` (functional, in place) and ``OlicaPruner`` (the optimum-style shell).

optimum has no pruner base class; ``OlicaPruner`` follows the shape of its quantizers
(``ORTQuantizer.from_pretrained(model_or_path)`` then ``quantize(config, save_dir)``): ``from_pretrained``, then
``prune(config, calibration_dataset, save_directory)``, ``save_pretrained`` and ``push_to_hub`` (uploads the saved
folder with a model card, `optimum_olica.hub`). The recipe, ``OlicaConfig``, is a peft-style dataclass rather than
optimum's ``BaseConfig``, which is a transformers model config: a pruning recipe describes a procedure, not a model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .allocation import plan_dimensions, plan_with_ffn_widths
from .atomic_io import prepare_output_directory, write_directory_atomically
from .checkpoint import save_pruned_model
from .configuration import OlicaConfig
from .conversion import build_decoder_layer, olica_config_from
from .data import get_calibration_dataset
from .errors import CalibrationDataError, OlicaError
from .inspection import format_summary
from .integrity import verify_saved_checkpoint
from .loading import TokenizerNotFoundError, check_model_location, load_config, load_tokenizer
from .modeling import OLICA_CONFIG_FOR_BASE_MODEL_TYPE
from .olica import FfnNeuronScores, OlicaLayerPruner, calibration_branch_state
from .pipeline import CalibrationActivations, PipelineTimings, capture_layer_inputs, run_dense, run_sequential
from .resume import (
    LayerCheckpoint,
    ResumableSink,
    fingerprint_safetensors_files,
    fingerprint_state_dict,
    run_manifest,
)
from .self_calibration import generate_calibration_ids, has_start_token, mix_calibration_ids
from .sinks import ModelSink, ShardSink
from .sources import ModelLayerSource, SafetensorsLayerSource, SafetensorsWeights


logger = logging.getLogger(__name__)

REPORT_NAME = "olica_report.json"
CALIBRATION_TOKENS_PER_BATCH = 4096


def calibration_batch_size(sequence_length: int) -> int:
    """Sequences per calibration batch: about CALIBRATION_TOKENS_PER_BATCH tokens, an even count when above one.

    The refit's cross-validation folds take the even and the odd sequences of each batch; with even batches these are
    the even and odd sequences of the whole set, so data mixed by `mix_calibration_ids` (data, generated, data, ...)
    puts each source in its own fold whatever the sequence length.
    """
    batch_size = max(1, CALIBRATION_TOKENS_PER_BATCH // sequence_length)
    return batch_size - batch_size % 2 if batch_size > 1 else batch_size


@dataclass
class PruningResult:
    """The pruned model and what pruning measured."""

    model: PreTrainedModel
    report: dict


def _compute_device(model: torch.nn.Module, requested: str | None) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    weight = embeddings.weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def prune_model(
    model: PreTrainedModel,
    config: OlicaConfig,
    calibration_input_ids: torch.Tensor,
    *,
    progress: bool = True,
    stream_from: str | os.PathLike | None = None,
    stream_to: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    offload_activations: bool = False,
    calibration_info: dict | None = None,
    layer_algorithm: Callable | None = None,
) -> PruningResult:
    """Prune ``model`` with Olica; returns the pruned model (an Olica architecture) and the report.

    The decoder layers of ``model`` are replaced in place as pruning proceeds (so memory falls while it runs); use
    the returned model afterwards, not ``model``.

    Args:
        model: a causal LM of a supported family, loaded normally or with an accelerate device map (offload included).
        config: the recipe.
        calibration_input_ids: ``(num_samples, sequence_length)`` token ids.
        progress: show a progress bar per layer.
        stream_from: streaming mode: the local safetensors checkpoint of ``model``, whose weights are read one layer
            at a time (``model`` may then be an empty skeleton on the meta device).
        stream_to: streaming mode: a directory (normally a staging directory) where the pruned checkpoint is written
            layer by layer; the returned ``PruningResult.model`` is then None.
        checkpoint_dir: a directory where the progress is saved after each layer (see ``optimum_olica.resume``). A
            run interrupted at any point (a kill included) and started again with the same arguments continues after
            the last finished layer and gives bit-identical weights; different arguments, model or data are refused
            with ``ResumeMismatchError``. The directory is kept: delete it once the pruned model is saved.
        device: the compute device of the layer-by-layer pass, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default
            CUDA when available, else the CPU. A setting of the run, not of the recipe: a run resumed on another
            device continues (on the same kind of device, bit-identically).
        offload_activations: keep the calibration activations on the CPU between layers (less accelerator memory,
            the same weights).
        calibration_info: recorded in the report's ``calibration_data`` beside the token counts: what the ids were
            made from (``source``; default the recipe's ``calibration_source``) and, for self-generated sequences,
            ``self_generated_samples`` and ``generation_s``.
        layer_algorithm: for research comparisons, ``(plan_config, config) -> LayerAlgorithm`` replacing Olica's
            per-layer algorithm (``optimum_olica.pipeline.LayerAlgorithm``; the benchmarks' magnitude baseline,
            ``bench/magnitude.py``, is one) on the same plan, pipeline, checkpoint writing and report.
    """
    if config.self_calibration == "auto":  # token ids are used as they are: nothing is generated
        config = dataclasses.replace(config, self_calibration=0.0)
    run = _plan_run(model, config, calibration_input_ids, device, offload_activations, layer_algorithm)
    model.eval()
    weights = _streamed_weights(stream_from, stream_to)
    checkpoint = None if checkpoint_dir is None else LayerCheckpoint(checkpoint_dir, _run_manifest(run, weights))
    resume_point = None if checkpoint is None else checkpoint.open()  # before any work: a mismatch fails at once
    source, sink = _source_and_sink(model, weights, stream_to)
    activations = _capture(run, weights)
    _allocate_layers(run, source, activations, progress)  # before a resume restores any pruned layer into the model
    if run.algorithm.wants_dense_trajectory:
        activations.dense_hidden_states = list(activations.hidden_states)  # the first layer's inputs are shared
    first_layer = 0
    if checkpoint is not None:
        sink = ResumableSink(sink, checkpoint, activations, run.algorithm, run.timings,
                             functools.partial(build_decoder_layer, run.plan_config), len(source))
        first_layer = sink.restore(resume_point)
    records = run_sequential(
        source, sink, activations, run.algorithm, run.device,
        timings=run.timings, progress=progress, first_layer=first_layer,
    )
    if checkpoint is not None:
        records = sink.records  # the restored layers' and these
    del activations
    chosen = run.algorithm.choose_calibrated_layers(config.num_calibrated_layers, exclude=tuple(config.skip_layers))
    final_config = _final_config(run, chosen)
    pruned = sink.finish(final_config, {c.layer_idx: calibration_branch_state(c.fit) for c in chosen})
    parameters_after = final_config.count_parameters() if pruned is None else pruned.num_parameters()
    report = _report(run, final_config, parameters_after, chosen, records, weights is not None, calibration_info or {})
    return PruningResult(pruned, report)


@dataclass
class _Run:
    """What one pruning run settled before its first layer: the inputs, the plan, the algorithm, where it computes."""

    model: PreTrainedModel
    config: OlicaConfig
    calibration_input_ids: torch.Tensor
    plan: object  # allocation.PruningPlan
    plan_config: object  # the Olica config at the planned dimensions
    calibration_rank: int
    device: torch.device
    storage: torch.device
    algorithm: object  # pipeline.LayerAlgorithm
    make_algorithm: Callable  # plan_config -> the algorithm (made again when the allocation changes the plan)
    method: str  # the algorithm's name, for the report and the resume fingerprints
    timings: PipelineTimings
    started: float


def _plan_run(
    model, config: OlicaConfig, calibration_input_ids: torch.Tensor, device, offload_activations: bool, layer_algorithm
) -> _Run:
    """Check the inputs, plan the dimensions, choose the devices and make the algorithm, before any work."""
    started = time.perf_counter()
    refuse_pruned_model(model.config, further_ratio=config.ratio)
    _check_calibration_input_ids(calibration_input_ids, model.config)
    full_config = olica_config_from(model.config)
    skip_layers = tuple(config.skip_layers)
    out_of_range = [layer for layer in skip_layers if layer >= full_config.num_hidden_layers]
    if out_of_range:
        raise OlicaError(
            f"skip_layers={list(skip_layers)} names layers {out_of_range} but the model has "
            f"{full_config.num_hidden_layers} layers (0 to {full_config.num_hidden_layers - 1})."
        )
    calibration_rank = config.calibration_rank_for(full_config.hidden_size)
    plan = plan_dimensions(
        full_config,
        config.ratio,
        qk_ratio=config.qk_ratio,
        vo_ratio=config.vo_ratio,
        ffn_ratio=config.ffn_ratio,
        calibration_rank=calibration_rank,
        num_calibrated_layers=config.num_calibrated_layers,
        skip_layers=skip_layers,
        dimension_multiple=config.dimension_multiple,
    )
    plan_config = olica_config_from(model.config, **plan.per_layer_lists())
    plan_config._attn_implementation = model.config._attn_implementation
    device, storage = _run_devices(model, device, offload_activations)

    refit_sequences = config.refit_sequence_mask()
    if refit_sequences is not None and refit_sequences.shape[0] != calibration_input_ids.shape[0]:
        raise OlicaError(
            f"refit_on='data' with self_calibration={config.self_calibration} reads {config.num_samples} sequences "
            f"mixed as mix_calibration_ids lays them out, but {calibration_input_ids.shape[0]} were given: pass "
            "num_samples sequences, or use refit_on='all'."
        )

    def make_algorithm(plan_config):
        if layer_algorithm is not None:
            return layer_algorithm(plan_config, config)
        return OlicaLayerPruner(
            plan_config,
            calibration_rank=calibration_rank,
            ridge_strength=config.ridge_strength,
            refit_damping=config.refit_damping,
            storage_device=storage,
            statistics_dtype=getattr(torch, config.statistics_dtype),
            value_decomposition=config.value_decomposition,
            skip_layers=skip_layers,
            refit_sequences=refit_sequences,
            trajectory_weight=config.trajectory_weight,
            qk_covariance_shrinkage=config.qk_covariance_shrinkage,
            value_covariance_shrinkage=config.value_covariance_shrinkage,
            qk_score_weighting=config.qk_score_weighting,
        )

    algorithm = make_algorithm(plan_config)
    return _Run(model, config, calibration_input_ids, plan, plan_config, calibration_rank, device, storage,
                algorithm, make_algorithm, getattr(algorithm, "name", type(algorithm).__name__), PipelineTimings(),
                started)


# The share of the calibration batches the adaptive allocation's dense pass reads: the widths it gives from a quarter
# and from all of the benchmark calibration differ by a few neurons per layer, at a quarter of a dense forward.
ALLOCATION_SHARE = 0.25


def _allocate_layers(run: _Run, source, activations: CalibrationActivations, progress: bool) -> None:
    """``layer_allocation="adaptive"``: the pruned layers' FFN widths from one dense pass over a share of the
    calibration batches, keeping as many neurons in all as the uniform plan (so the same parameter count)."""
    config, plan = run.config, run.plan
    full = run.model.config.intermediate_size
    pruned = [layer for layer in range(len(plan.layers)) if layer not in set(config.skip_layers)]
    keep_total = sum(plan.layers[layer].intermediate_size for layer in pruned)
    if config.layer_allocation != "adaptive" or keep_total == full * len(pruned) or len(pruned) < 2:
        return  # nothing to move between layers
    tick = time.perf_counter()
    scores = FfnNeuronScores(getattr(torch, config.statistics_dtype), tuple(config.skip_layers))
    num_batches = max(1, round(len(activations.hidden_states) * ALLOCATION_SHARE))
    run_dense(source, activations, scores.observe, run.device, num_batches=num_batches, progress=progress)
    widths = scores.widths(keep_total, config.dimension_multiple)
    run.plan = plan_with_ffn_widths(
        olica_config_from(run.model.config), plan,
        [widths.get(layer, dimensions.intermediate_size) for layer, dimensions in enumerate(plan.layers)],
    )
    run.plan_config = olica_config_from(run.model.config, **run.plan.per_layer_lists())
    run.plan_config._attn_implementation = run.model.config._attn_implementation
    run.algorithm = run.make_algorithm(run.plan_config)
    run.timings.allocation = time.perf_counter() - tick


def _run_devices(model, device, offload_activations: bool) -> tuple[torch.device, torch.device]:
    """Where the layers compute and where the activations wait between layers: the run's settings, checked."""
    if not isinstance(offload_activations, bool):
        raise OlicaError(f"offload_activations must be True or False, got {offload_activations!r}.")
    try:
        compute = _compute_device(model, device)
    except (RuntimeError, TypeError) as error:
        raise OlicaError(
            f"device={device!r} is not a device: give one such as 'cpu', 'cuda' or 'cuda:1', or None for CUDA when "
            f"available ({error})."
        ) from None
    return compute, torch.device("cpu") if offload_activations else compute


def _run_manifest(run: _Run, weights) -> dict:
    """What identifies a run for resuming, fingerprinted before any layer is replaced."""
    return run_manifest(
        model_config=run.model.config,
        weights_fingerprint=(
            fingerprint_safetensors_files(list(weights.file_of.values())) if weights is not None
            else fingerprint_state_dict(run.model.state_dict())
        ),
        recipe=run.config.to_dict(),
        input_ids=run.calibration_input_ids,
        method=run.method,
        streaming=weights is not None,
    )


def _streamed_weights(stream_from, stream_to) -> SafetensorsWeights | None:
    if stream_from is None:
        return None
    if stream_to is None:
        raise OlicaError("Streaming mode writes the pruned layers to disk as it goes: pass stream_to=<directory>.")
    return SafetensorsWeights(stream_from)


def _source_and_sink(model, weights, stream_to):
    """Where layers come from and go to: the model itself, or safetensors files in streaming mode."""
    if weights is None:
        return ModelLayerSource(model), ModelSink(model)
    return SafetensorsLayerSource(model, weights), ShardSink(stream_to, weights, model)


def _capture(run: _Run, weights: SafetensorsWeights | None) -> CalibrationActivations:
    """The first layer's inputs for every calibration batch (a streamed skeleton's embeddings only for this)."""
    model, streaming = run.model, weights is not None
    if streaming:
        _materialize_input_embeddings(model, weights)
    tick = time.perf_counter()
    activations = capture_layer_inputs(
        model, run.calibration_input_ids, batch_size=calibration_batch_size(run.calibration_input_ids.shape[1]),
        storage_device=run.storage, input_device=_input_device(model),
    )
    run.timings.capture = time.perf_counter() - tick
    if streaming:
        model.get_input_embeddings().to("meta")  # the layer loop is the memory peak; the files hold the embeddings
    return activations


def _final_config(run: _Run, chosen):
    """The pruned model's config: the planned dimensions, the ranks of the calibration branches chosen, the recipe."""
    dimensions = run.plan.per_layer_lists()
    for candidate in chosen:
        dimensions["calibration_ranks"][candidate.layer_idx] = candidate.fit.down.shape[0]
    return olica_config_from(run.model.config, **dimensions, olica_recipe=run.config.to_dict())


def _report(run: _Run, final_config, parameters_after: int, chosen, records, streaming: bool, calibration_info: dict
            ) -> dict:
    """``olica_report.json``: what was pruned, how, from what data, in how long."""
    model, config, plan = run.model, run.config, run.plan
    num_samples, sequence_length = run.calibration_input_ids.shape
    parameters_before = plan.parameters_before
    report = {
        "format_version": 1,
        "base_model": getattr(model.config, "_name_or_path", None) or None,
        "base_model_type": model.config.model_type,
        "parameters_before": parameters_before,
        "parameters_after": parameters_after,
        "method": run.method,
        "target_ratio": config.ratio,
        "achieved_ratio": 1 - parameters_after / parameters_before,
        "part_ratios": {"qk": plan.ratios.qk, "vo": plan.ratios.vo, "ffn": plan.ratios.ffn},
        "layer_allocation": config.layer_allocation,
        "calibrated_layers": [candidate.layer_idx for candidate in chosen],
        "calibration_rank": run.calibration_rank,
        "calibration_data": {
            "source": config.calibration_source,
            "num_samples": int(num_samples),
            "sequence_length": int(sequence_length),
            "num_tokens": int(num_samples * sequence_length),
            "seed": config.seed,
            **calibration_info,
        },
        "layers": records,
        "timings": run.timings.to_dict(),
        "runtime_s": time.perf_counter() - run.started,
        "device": str(run.device),
        "offload_activations": run.storage != run.device,
        "streaming": streaming,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
    }
    for layer, record in enumerate(report["layers"]):
        record.update(
            layer=layer,
            query_rank=final_config.query_ranks[layer],
            key_rank=final_config.key_ranks[layer],
            value_head_dim=final_config.value_head_dims[layer],
            intermediate_size=final_config.intermediate_sizes[layer],
            calibration_rank=final_config.calibration_ranks[layer],
            parameters=final_config.layer_parameter_count(layer),
        )
    return report


# The model types of the pruned architectures (`olica_llama`, ...), which Olica does not prune a second time.
PRUNED_MODEL_TYPES = frozenset(config_class.model_type for config_class in OLICA_CONFIG_FOR_BASE_MODEL_TYPE.values())


def refuse_pruned_model(model_config, further_ratio: float | None = None) -> None:
    """Refuse an Olica-pruned model (plugin class or ``trust_remote_code``), before any work is done.

    Its layers have factored ``q_proj``/``k_proj`` and narrower value heads, which the algorithm does not start
    from; pruning the base model once, harder, gives the same size with one calibration instead of two.

    Args:
        model_config: the config of the model to prune.
        further_ratio: the ``ratio`` asked of the pruned model, to translate into a ratio of the base model.
    """
    model_type = getattr(model_config, "model_type", None)
    if model_type not in PRUNED_MODEL_TYPES:
        return
    recipe = getattr(model_config, "olica_recipe", None)
    earlier = recipe.get("ratio") if isinstance(recipe, dict) else None
    advice = "prune the base model instead, once, with a higher ratio"
    if isinstance(earlier, (int, float)) and further_ratio is not None:
        total = 1 - (1 - earlier) * (1 - further_ratio)
        advice += (
            f" (removing a further {further_ratio:.0%} of this model, which kept {1 - earlier:.0%} of its base, is "
            f"ratio={total:.3f} of the base model)"
        )
    raise OlicaError(
        f"This model is already pruned by Olica (model_type={model_type!r}) and cannot be pruned again: its "
        f"layers have factored q_proj/k_proj and narrower value heads, not the {model_type.removeprefix('olica_')} "
        f"layers Olica starts from. To make it smaller, {advice}."
    )


def _check_calibration_input_ids(input_ids, model_config) -> None:
    """Refuse calibration data the pipeline would fail on deep inside, or that would calibrate nothing."""
    if not isinstance(input_ids, torch.Tensor):
        raise CalibrationDataError(
            f"calibration_input_ids must be a torch tensor of token ids, got {type(input_ids).__name__}; tokenize "
            "the text first (optimum_olica.get_calibration_dataset) or pass the text to OlicaPruner.prune."
        )
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise CalibrationDataError(
            f"calibration_input_ids must be a non-empty (num_samples, sequence_length) tensor, got shape "
            f"{tuple(input_ids.shape)}."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise CalibrationDataError(
            f"calibration_input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass token ids from "
            "the model's tokenizer (torch.long), not embeddings or a mask."
        )
    vocab_size = getattr(model_config, "vocab_size", None)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise CalibrationDataError(
            f"calibration_input_ids hold token ids from {low} to {high}, outside the model's vocabulary "
            f"[0, {vocab_size}); they were made with another tokenizer. Tokenize with the model's own tokenizer."
        )
    pad = getattr(model_config, "pad_token_id", None)
    if pad is not None and bool((input_ids == pad).all()):
        raise CalibrationDataError(
            f"calibration_input_ids are all padding (pad_token_id={pad}): there is no text to calibrate on. Use "
            "longer documents or a shorter sequence_length, so that windows are filled with text."
        )
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise CalibrationDataError(
            f"sequence_length={input_ids.shape[1]} exceeds the model's max_position_embeddings="
            f"{max_positions}; use a shorter sequence_length."
        )


def _materialize_input_embeddings(model, weights: SafetensorsWeights) -> None:
    """In a meta skeleton, load only what runs before the first decoder layer: the input embeddings."""
    from accelerate.utils import set_module_tensor_to_device

    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            key = f"{name}.weight"
            tensor = weights.load([key], torch.device("cpu"))[key]
            set_module_tensor_to_device(model, key, "cpu", value=tensor)
            return



class OlicaPruner:
    """Prunes a causal LM with Olica and writes a checkpoint that reloads with ``from_pretrained``.

    Example:
        ```python
        >>> from optimum_olica import OlicaConfig, OlicaPruner
        >>> pruner = OlicaPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        >>> model = pruner.prune(OlicaConfig(ratio=0.2), save_directory="smollm2-olica-20")
        ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer=None,
        checkpoint_dir: str | os.PathLike | None = None,
        *,
        weights_dir: str | os.PathLike | None = None,
    ):
        """
        Args:
            model: the model to prune (for streaming, an empty skeleton on the meta device).
            tokenizer: needed for text calibration data.
            checkpoint_dir: default resume directory of ``prune`` (progress saved after each layer).
            weights_dir: streaming: the local safetensors checkpoint the weights are read from, one layer at a time.
        """
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"OlicaPruner needs a transformers PreTrainedModel, got {type(model).__name__}.")
        refuse_pruned_model(model.config)
        olica_config_from(model.config)  # fails early, naming the supported families
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.pruned_model: PreTrainedModel | None = None
        self.report: dict | None = None
        self.config: OlicaConfig | None = None
        # Seconds spent sampling self-generated calibration sequences (None: none were), for the report.
        self.generation_s: float | None = None
        # The folder the checkpoint was last written to; push_to_hub uploads it.
        self.saved_directory: Path | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_or_path,
        tokenizer=None,
        *,
        streaming: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        **model_kwargs,
    ) -> "OlicaPruner":
        """Load the model to prune (a Hub id or a local folder) or wrap one already loaded.

        Args:
            model_or_path: a ``PreTrainedModel`` (any dtype, any device map) or a name/path for
                ``AutoModelForCausalLM.from_pretrained``.
            tokenizer: a tokenizer, its folder or Hub id, or None to load the model's own (needed for text calibration
                data). The model's own is loaded before the model, and only a warning says when there is none (token-id
                calibration data needs none).
            streaming: load nothing now: build the model skeleton on the meta device and, while pruning, read each
                layer's weights from the safetensors files only while that layer is processed (peak memory is about
                one layer plus the calibration activations). A Hub id is downloaded first.
            checkpoint_dir: where ``prune`` saves its progress after each layer, so that a run killed at any point
                continues, when started again with the same arguments, after the last finished layer (see ``prune``).
            model_kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``revision``, ``token``, ...).
        """
        if not isinstance(model_or_path, PreTrainedModel):
            check_model_location(model_or_path)  # a mistyped folder is "no such folder", not a bad Hub repo id
        if streaming:
            return cls._streaming_skeleton(model_or_path, tokenizer, checkpoint_dir, **model_kwargs)
        if isinstance(model_or_path, PreTrainedModel):
            model = model_or_path
            tokenizer = _resolve_tokenizer(tokenizer, getattr(model.config, "_name_or_path", None), {})
        else:
            name = os.fspath(model_or_path) if isinstance(model_or_path, os.PathLike) else str(model_or_path)
            model_kwargs.setdefault("dtype", "auto")
            refuse_pruned_model(load_config(name, model_kwargs))  # before the weights are loaded
            # The tokenizer before the weights: a missing one is reported in seconds, not after minutes of loading.
            tokenizer = _resolve_tokenizer(tokenizer, name, model_kwargs)
            model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
        return cls(model, tokenizer, checkpoint_dir)

    @classmethod
    def _streaming_skeleton(cls, model_or_path, tokenizer=None, checkpoint_dir=None, **model_kwargs) -> "OlicaPruner":
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        if isinstance(model_or_path, PreTrainedModel):
            raise OlicaError("streaming=True reads weights from files: pass a checkpoint path or Hub id, not a model.")
        directory = Path(str(model_or_path)).expanduser()
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(model_or_path), revision=model_kwargs.get("revision"),
                                               token=model_kwargs.get("token")))
        config = AutoConfig.from_pretrained(directory)
        refuse_pruned_model(config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None))
        model.config._name_or_path = str(model_or_path)
        tokenizer = _resolve_tokenizer(tokenizer, str(directory), {})
        return cls(model, tokenizer, checkpoint_dir, weights_dir=directory)

    def calibration_input_ids(
        self, config: OlicaConfig, calibration_dataset=None, *, text_column: str | None = None
    ) -> torch.Tensor:
        """Token windows for calibration: ``calibration_dataset`` (ids, texts, a dataset or a path) or the config's;
        ``text_column`` names the text column of a tabular source (see `get_calibration_dataset`)."""
        self.generation_s = None
        config = self._with_self_calibration(config, calibration_dataset)
        if isinstance(calibration_dataset, torch.Tensor):
            if config.self_calibration > 0:
                raise OlicaError(
                    f"self_calibration={config.self_calibration} cannot be applied to calibration token ids, which are "
                    "used as they are: pass the text instead, or mix generated sequences in yourself with "
                    "optimum_olica.generate_calibration_ids and mix_calibration_ids."
                )
            _check_calibration_input_ids(calibration_dataset, self.model.config)  # before .long() hides floats
            return calibration_dataset.long()
        num_generated = config.self_generated_samples()
        generated = self._self_generated_ids(config, num_generated) if num_generated else None
        if num_generated == config.num_samples:
            return generated  # all self-generated: no data is read
        if self.tokenizer is None:
            raise OlicaError(
                "The model has no tokenizer, so text calibration data cannot be tokenized: pass tokenizer= to "
                "OlicaPruner.from_pretrained, or pass calibration_dataset as a (num_samples, sequence_length) tensor."
            )
        source = config.calibration_source if calibration_dataset is None else calibration_dataset
        data = get_calibration_dataset(
            self.tokenizer, source, num_samples=config.num_samples - num_generated,
            sequence_length=config.sequence_length, seed=config.seed, text_column=text_column,
        )
        return data if generated is None else mix_calibration_ids(data, generated)

    def _self_generated_ids(self, config: OlicaConfig, count: int) -> torch.Tensor:
        """``count`` sequences sampled from the model (`config.self_calibration`); the seconds go to the report."""
        if self.weights_dir is not None:
            raise OlicaError(
                f"self_calibration={config.self_calibration} needs the model loaded to generate text, and a streaming "
                "pruner holds no weights: generate the sequences with a loaded model "
                "(optimum_olica.generate_calibration_ids), or set self_calibration=0."
            )
        started = time.perf_counter()
        ids = generate_calibration_ids(self.model, self.tokenizer, count, config.sequence_length, seed=config.seed)
        self.generation_s = time.perf_counter() - started
        return ids

    def prune(
        self,
        config: OlicaConfig | None = None,
        calibration_dataset=None,
        save_directory: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        text_column: str | None = None,
        device: str | torch.device | None = None,
        offload_activations: bool = False,
    ) -> PreTrainedModel:
        """Prune the model; returns the pruned model and, with ``save_directory``, writes the checkpoint.

        In streaming mode (``from_pretrained(..., streaming=True)``) the checkpoint is written to ``save_directory``
        layer by layer and nothing is returned: load it with ``AutoModelForCausalLM.from_pretrained``.

        Args:
            config: the recipe (default ``OlicaConfig()``: 20% of all parameters).
            calibration_dataset: token ids ``(num_samples, sequence_length)``, a list of strings, a
                ``datasets.Dataset`` or a local path; default: ``config.calibration_source``.
            save_directory: where to write the checkpoint (atomically); checked before pruning starts.
            overwrite: replace an existing non-empty ``save_directory``.
            progress: show progress bars and print the summary table.
            checkpoint_dir: save the progress here after each layer (default: the pruner's ``checkpoint_dir``). A
                run killed at any point and started again with the same model, recipe and calibration data continues
                after the last finished layer and writes a bit-identical checkpoint; other arguments are refused
                (``ResumeMismatchError``). Once ``save_directory`` is written and verified, the resume files are
                deleted; without ``save_directory`` they are kept.
            text_column: the column holding the text of a tabular source (.json, .jsonl, .parquet, .csv, a
                ``datasets.Dataset``); default ``"text"``, else the only string column. Recorded in the report beside
                the source.
            device: the compute device of the layer-by-layer pass (default: CUDA when available, else the CPU).
            offload_activations: keep the calibration activations on the CPU between layers.

        Neither ``device`` nor ``offload_activations`` is part of the recipe or changes the weights (on the same kind
        of device); the device used is in the report. Streaming is chosen by ``from_pretrained(..., streaming=True)``.
        """
        config = self._with_self_calibration(config or OlicaConfig(), calibration_dataset)
        if self.pruned_model is not None:
            raise RuntimeError("This pruner has already pruned its model; create a new OlicaPruner to prune again.")
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else self.checkpoint_dir
        if save_directory is not None:
            target = prepare_output_directory(save_directory, overwrite)
            if checkpoint_dir is not None:
                resume_directory = Path(checkpoint_dir).expanduser().resolve()
                if resume_directory == target or target in resume_directory.parents:
                    raise OlicaError(
                        f"checkpoint_dir {resume_directory} is (inside) save_directory {target}, which is replaced "
                        "when the pruned model is saved: choose a checkpoint_dir outside save_directory."
                    )
        input_ids = self.calibration_input_ids(config, calibration_dataset, text_column=text_column)
        run_settings = {
            "device": device, "offload_activations": offload_activations, "checkpoint_dir": checkpoint_dir,
            "calibration_info": self._calibration_info(config, calibration_dataset, text_column),
        }
        if self.weights_dir is not None:
            return self._prune_streaming(config, input_ids, save_directory, overwrite, progress, run_settings)
        result = prune_model(self.model, config, input_ids, progress=progress, **run_settings)
        self.pruned_model, self.report, self.config = result.model, result.report, config
        if progress:
            print(format_summary(result.report))
        if save_directory is not None:
            self.save_pretrained(save_directory, overwrite=overwrite)
            _remove_resume_files(checkpoint_dir)
        return result.model

    def _with_self_calibration(self, config: OlicaConfig, calibration_dataset) -> OlicaConfig:
        """``config`` with ``self_calibration="auto"`` resolved (``OlicaConfig.resolve_self_calibration``), so that
        the report, the saved recipe and a resume record what was drawn: none for token ids (used as they are), in
        streaming mode (no weights to generate with), with weights offloaded to the CPU or disk (each generated token
        would read every weight across the bus), or for a model that names no token to start generating from."""
        if config.self_calibration != "auto":
            return config
        if isinstance(calibration_dataset, torch.Tensor):  # token ids are used as they are
            return dataclasses.replace(config, self_calibration=0.0)
        resolved = config.resolve_self_calibration(own_data=calibration_dataset is not None)
        if not resolved.self_calibration:
            return resolved
        placements = {str(place) for place in (getattr(self.model, "hf_device_map", None) or {}).values()}
        # On the CPU beside an accelerator, or on disk, weights are offloaded; a model wholly on the CPU is not.
        offloaded = "disk" in placements or ("cpu" in placements and len(placements) > 1)
        reason = ("its weights are streamed from files" if self.weights_dir is not None
                  else "its weights are offloaded" if offloaded
                  else None if has_start_token(self.model, self.tokenizer) else "it names no BOS or EOS token")
        if reason:
            logger.info("self_calibration='auto': the model generates no calibration text (%s), so the calibration "
                        "is the data alone (set self_calibration=0.5 to generate anyway).", reason)
            return dataclasses.replace(config, self_calibration=0.0)
        return resolved

    def _calibration_info(self, config: OlicaConfig, calibration_dataset, text_column: str | None) -> dict:
        """What the calibration ids were made from, for the report's ``calibration_data``."""
        if not isinstance(calibration_dataset, (type(None), str)):
            source = type(calibration_dataset).__name__
        else:
            source = config.calibration_source if calibration_dataset is None else calibration_dataset
        if text_column is not None:
            source = f"{source} (text column {text_column!r})"
        info = {"source": str(source)}
        if self.generation_s is not None:
            generated = config.self_generated_samples()
            info.update(self_generated_samples=generated, generation_s=self.generation_s, refit_on=config.refit_on)
            if generated == config.num_samples:
                info["source"] = "self-generated"
        return info

    def _prune_streaming(self, config, input_ids, save_directory, overwrite: bool, progress: bool, run_settings: dict):
        if save_directory is None:
            raise OlicaError("Streaming writes the pruned checkpoint layer by layer: pass save_directory=.")

        def write(staging: Path) -> None:
            result = prune_model(
                self.model, config, input_ids, progress=progress, stream_from=self.weights_dir, stream_to=staging,
                **run_settings,
            )
            self.report, self.config = result.report, config
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            (staging / "olica_config.json").write_text(config.to_json_string(), encoding="utf-8")
            (staging / REPORT_NAME).write_text(json.dumps(result.report, indent=2, sort_keys=True), encoding="utf-8")

        self.saved_directory = write_directory_atomically(
            save_directory, write, overwrite=overwrite,
            verify=lambda staging: verify_saved_checkpoint(staging, self.report["parameters_after"]),
        )
        _remove_resume_files(run_settings["checkpoint_dir"])
        if progress:
            print(format_summary(self.report))
        return None

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the pruned checkpoint: weights, config, tokenizer, ``olica_config.json``, ``olica_report.json``."""
        if self.pruned_model is None:
            raise RuntimeError("Nothing to save yet: call prune() first.")
        self.saved_directory = save_pruned_model(
            self.pruned_model,
            save_directory,
            tokenizer=self.tokenizer,
            overwrite=overwrite,
            extra_files={
                "olica_config.json": self.config.to_json_string(),
                REPORT_NAME: json.dumps(self.report, indent=2, sort_keys=True),
            },
            expected_parameters=self.report["parameters_after"],
        )
        return self.saved_directory

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        *,
        commit_message: str | None = None,
        base_model: str | None = None,
        license: str | None = None,
        endpoint: str | None = None,
    ) -> str:
        """Upload the saved checkpoint folder (the last ``save_directory``) to the Hub, with a model card.

        The card (``README.md``, written into the folder) holds the base model, recipe, parameters before and after,
        calibration data, recorded evaluations, how to load the model, and the base model's license when its card is
        available locally (see `optimum_olica.hub.build_model_card`). Returns the commit URL. Raises
        `optimum_olica.hub.HubUploadError` (the local checkpoint intact) without a token or network.

        Args:
            repo_id: ``"user/name"``; created if missing.
            private: make a new repository private (None: the account's default).
            token: a token with write access (default: ``HF_TOKEN`` or the ``hf auth login`` token).
            commit_message: see `optimum_olica.hub.push_to_hub`.
            base_model: see `optimum_olica.hub.push_to_hub`.
            license: see `optimum_olica.hub.push_to_hub`.
            endpoint: see `optimum_olica.hub.push_to_hub`.
        """
        from .hub import push_to_hub

        if self.saved_directory is None:
            raise RuntimeError(
                "Nothing saved yet: push_to_hub uploads the saved checkpoint folder. Call "
                "prune(config, save_directory=...) or save_pretrained(directory) first."
            )
        return push_to_hub(
            self.saved_directory, repo_id, private=private, token=token, commit_message=commit_message,
            base_model=base_model, license=license, endpoint=endpoint,
        )


def _resolve_tokenizer(tokenizer, model_name: str | None, model_kwargs: dict):
    """The tokenizer to calibrate with: ``tokenizer`` itself, loaded from it when it is a folder or Hub id, or else
    the model's own. A model without one only gets a warning: token-id calibration data needs no tokenizer."""
    if isinstance(tokenizer, (str, os.PathLike)):
        # revision and subfolder locate the model's files, not those of a tokenizer named on its own.
        kwargs = {key: value for key, value in model_kwargs.items() if key not in ("revision", "subfolder")}
        return load_tokenizer(tokenizer, **kwargs)
    if tokenizer is not None or not model_name:
        return tokenizer
    try:
        return load_tokenizer(model_name, **model_kwargs)
    except (TokenizerNotFoundError, FileNotFoundError) as error:
        logger.warning(
            "%s: text calibration data cannot be tokenized. Pass tokenizer= (a tokenizer, or its folder or Hub id), "
            "or token ids as calibration_dataset.", error,
        )
        return None


def _remove_resume_files(checkpoint_dir) -> None:
    """The output is written and verified: the resume files (as large as the pruned model) have served."""
    if checkpoint_dir is not None:
        LayerCheckpoint(checkpoint_dir, manifest={}).remove()


__all__ = ["OlicaPruner", "PruningResult", "format_summary", "prune_model"]

"""optimum-olica: Olica structured pruning for Hugging Face causal language models.

Importing the package registers the pruned architectures with transformers' Auto classes, so pruned checkpoints load
with ``AutoModelForCausalLM.from_pretrained``. It touches no GPU.
"""

from .adapters import peft_target_modules
from .checkpoint import save_pruned_model
from .conversion import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, convert_to_olica, to_stock_model
from .configuration import OlicaConfig
from .errors import (
    CalibrationDataError,
    CheckpointVerificationError,
    NonFiniteActivationsError,
    OlicaConfigError,
    OlicaError,
    ResumeMismatchError,
)
from .data import get_calibration_dataset
from .self_calibration import generate_calibration_ids, mix_calibration_ids
from .export import StockExport, export_to_stock
from .gguf_export import GGUFExport, export_to_gguf  # gguf and llama_cpp are imported only when it runs
from .evaluation import perplexity
from .memory_plan import MemoryPlan, plan_memory
from .pruner import OlicaPruner, format_summary, prune_model
from .zero_shot import evaluate_zero_shot  # lm-eval itself is imported only when it runs
from .modeling import (
    OlicaLlamaConfig,
    OlicaLlamaForCausalLM,
    OlicaMistralConfig,
    OlicaMistralForCausalLM,
    OlicaQwen2Config,
    OlicaQwen2ForCausalLM,
    OlicaQwen3Config,
    OlicaQwen3ForCausalLM,
)

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "OlicaConfig",
    "OlicaPruner",
    "format_summary",
    "get_calibration_dataset",
    "generate_calibration_ids",
    "mix_calibration_ids",
    "perplexity",
    "MemoryPlan",
    "plan_memory",
    "prune_model",
    "OlicaLlamaConfig",
    "OlicaLlamaForCausalLM",
    "OlicaMistralConfig",
    "OlicaMistralForCausalLM",
    "OlicaQwen2Config",
    "OlicaQwen2ForCausalLM",
    "OlicaQwen3Config",
    "OlicaQwen3ForCausalLM",
    "UnsupportedArchitectureError",
    "convert_to_olica",
    "save_pruned_model",
    "to_stock_model",
    "StockExport",
    "export_to_stock",
    "GGUFExport",
    "export_to_gguf",
    "CalibrationDataError",
    "CheckpointVerificationError",
    "NonFiniteActivationsError",
    "OlicaConfigError",
    "OlicaError",
    "ResumeMismatchError",
    "evaluate_zero_shot",
    "peft_target_modules",
]

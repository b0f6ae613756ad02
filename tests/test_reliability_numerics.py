"""Numerical safety: low-precision models, overflow and NaN named by layer, singular Gram matrices, determinism."""

from __future__ import annotations

import warnings

import pytest
import torch

import optimum_olica  # noqa: F401
from optimum_olica import olica_math as om
from optimum_olica.configuration import OlicaConfig
from optimum_olica.errors import NonFiniteActivationsError
from optimum_olica.olica import OlicaLayerPruner
from optimum_olica.pruner import OlicaPruner, prune_model

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def calibration_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(seed))


def test_statistics_of_low_precision_activations_accumulate_in_float64():
    """The sums, not the dtype they are read in (reading always returns float64): 18,000 bfloat16 tokens of
    1 + 2**-7, whose squares sum to a value that float32 (24-bit mantissa) or bfloat16 sums cannot hold to 1e-12."""
    assert OlicaLayerPruner(plan_config=None).statistics_dtype == torch.float64
    assert OlicaConfig().statistics_dtype == "float64"
    moments = om.StreamingMoments(4, gram=True, target_dim=4)
    batch = torch.full((3, 300, 4), 1.0 + 2**-7, dtype=torch.bfloat16)
    for _ in range(20):
        moments.update(batch, batch)
    assert moments.count == 18000
    square_sum = 18000 * (1.0 + 2**-7) ** 2  # exact in float64
    for name, value in [("gram", moments.gram[0, 1]), ("cross", moments.cross[2, 3]),
                        ("target_sum_squares", moments.target_sum_squares[1]),
                        ("second_moment x count", moments.second_moment[3] * 18000)]:
        assert float(value) == pytest.approx(square_sum, rel=1e-12), name


def test_the_pipeline_accumulates_its_statistics_in_the_dtype_the_recipe_names(monkeypatch):
    """A bfloat16 model: every StreamingMoments the pipeline builds accumulates in float64 by default, and in float32
    when ``statistics_dtype="float32"`` asks for it (observed on the objects built, not on a default value)."""
    built = []
    original_init = om.StreamingMoments.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(om.StreamingMoments, "__init__", recording_init)
    for statistics_dtype, expected in (("float64", torch.float64), ("float32", torch.float32)):
        built.clear()
        config = OlicaConfig(ratio=0.2, num_calibrated_layers=1, statistics_dtype=statistics_dtype)
        prune_model(make_tiny_model("llama_gqa").to(torch.bfloat16), config, calibration_ids(), progress=False)
        assert len(built) > 3 and {moments.dtype for moments in built} == {expected}, statistics_dtype


@pytest.mark.parametrize(
    "dtype, layer, poison",
    [(torch.float16, 1, "overflow"), (torch.bfloat16, 2, "nan"), (torch.float32, 0, "inf")],
)
def test_non_finite_activations_are_reported_at_their_layer(dtype, layer, poison, tmp_path):
    model = make_tiny_model("llama_gqa").to(dtype)
    down = model.model.layers[layer].mlp.down_proj.weight
    with torch.no_grad():
        if poison == "overflow":
            down.mul_(3e4)  # the FFN output exceeds float16's 65504
        else:
            down[0, 0] = float(poison)
    pruner = OlicaPruner(model)
    with pytest.raises(NonFiniteActivationsError, match=rf"Layer {layer} produced NaN/Inf") as error:
        pruner.prune(OlicaConfig(ratio=0.2), calibration_ids(), save_directory=tmp_path / "out", progress=False)
    assert isinstance(error.value, FloatingPointError)
    assert not (tmp_path / "out").exists()


def test_rank_deficient_gram_falls_back_to_a_stronger_ridge_with_a_warning():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    x = torch.cat([x, x[:, :3], torch.zeros(500, 3, dtype=torch.float64)], dim=1)  # duplicated and dead channels
    gram, cross = x.T @ x, x.T @ torch.randn(500, 4, generator=generator, dtype=torch.float64)
    with pytest.warns(UserWarning, match="used ridge"):
        solution = om.ridge_least_squares(gram, cross, 0.0)
    assert torch.isfinite(solution).all()

    moments = om.StreamingMoments(12, gram=True, target_dim=12)
    moments.update(x, torch.zeros_like(x))  # and a residual that is zero everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = om.fit_linear_calibration(moments, rank=2)
    assert torch.isfinite(fit.down).all() and torch.isfinite(fit.up).all()


def test_degenerate_calibration_data_prunes_without_crashing():
    """One token repeated everywhere: every position of a sequence sees nearly the same activations, so the Gram
    matrices of the refit and the calibration branch are close to rank one."""
    repeated = torch.full((8, 32), 7, dtype=torch.long)
    model = make_tiny_model("qwen2")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :16] = 0  # and a quarter of the channels dead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune_model(model, OlicaConfig(ratio=0.25), repeated, progress=False)
    with torch.no_grad():
        logits = result.model(calibration_ids()[:2]).logits
    assert torch.isfinite(logits).all()
    assert result.model.num_parameters() == result.report["parameters_after"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seed_gives_bit_identical_weights(dtype, tmp_path):
    saved = []
    for run in range(2):
        pruner = OlicaPruner(make_tiny_model("llama_bias", seed=3).to(dtype))
        pruner.prune(OlicaConfig(ratio=0.3), calibration_ids(), save_directory=tmp_path / str(run), progress=False)
        saved.append((tmp_path / str(run) / "model.safetensors").read_bytes())
    assert saved[0] == saved[1]

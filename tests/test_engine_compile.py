"""`compile=True` (torch.compile, opt-in): labels agree with nnU-Net's up to near-ties, each
loaded model compiles once, and a compiler that cannot run is a `CompileError` with a hint."""

from __future__ import annotations

import numpy as np
import pytest

from cryomamba import JobConfig
from cryomamba.engine import StreamingPredictor, TrainedModel
from cryomamba.engine.compiled import CompileError
from cryomamba.testing.reference import nnunet_predictor

# inductor's weight freezing imports torch.utils.mkldnn, which warns that torch.jit is deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")


@pytest.mark.slow
def test_compiled_labels_agree_with_nnunet_up_to_near_ties(tiny_model, noise_volume):
    model = TrainedModel.load(tiny_model)
    predictor = StreamingPredictor(model, compile=True)
    assert predictor.warm_up(noise_volume.shape) > 0
    assert predictor.networks is model.compiled_networks()  # built once per loaded model
    ours = predictor.predict(noise_volume)
    ref, probs = nnunet_predictor(tiny_model, folds=(0,)).predict_single_npy_array(
        noise_volume[None], {"spacing": [10.0, 10.0, 10.0]}, None, None, True
    )
    diff = ours != ref
    assert diff.mean() <= 1e-3
    if diff.any():  # fused kernels round differently: only where nnU-Net's top two nearly tie
        top2 = np.sort(probs[:, diff], axis=0)[-2:]
        assert (top2[1] - top2[0]).max() < 1e-2


@pytest.mark.slow
def test_a_compiler_that_cannot_run_is_a_compile_error(noise_volume, monkeypatch, tmp_path):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/g++"))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    # a network of its own (static shapes are baked into the kernels): no kernel is in any cache
    from cryomamba.testing import make_model_folder

    folder = make_model_folder(tmp_path / "odd", patch_size=(8, 16, 16), features=(3, 5))
    predictor = StreamingPredictor(TrainedModel.load(folder), compile=True)
    with pytest.raises(CompileError) as info:
        predictor.predict(noise_volume)
    assert info.value.code == "compile_failed" and "C++ compiler" in info.value.hint


def test_compile_is_off_by_default_and_reaches_the_engine(tiny_model):
    assert JobConfig().compile is False
    model = TrainedModel.load(tiny_model)
    assert StreamingPredictor(model).networks is model.networks
    assert JobConfig.from_dict({"compile": True}).compile is True

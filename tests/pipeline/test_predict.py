"""The Predictor: the channels-last and folded-norm fast paths give the same probabilities, and its
post-processing settings are checked against the model's classes when it is built."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from tests.pipeline.test_grid import PRE


@pytest.mark.parametrize("name", ["attention_unet", "danet", "emanet"])
def test_channels_last_inference_gives_the_same_probabilities(name):
    """The CPU predictor runs the network in NDHWC (faster 3D convolutions); the blended probabilities must equal
    those of the default layout, including through reshapes inside attention modules."""
    from attention3d import create_model
    from pipeline.config import InferenceConfig
    from pipeline.predict import Predictor

    torch.manual_seed(0)
    model = create_model(name, in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2]).eval()
    pre = PRE
    image = torch.randn(1, 1, 40, 36, 20)
    out = {}
    for cl in (False, True):
        predictor = Predictor(
            model, pre, patch_size=(32, 32, 16), inference=InferenceConfig(), precision="fp32", channels_last=cl
        )
        out[cl], _ = predictor.predict_probabilities(image)
    weights = [p for p in model.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    assert not any(w.is_contiguous() for w in weights)  # really converted, not contiguous in both layouts
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-4)


def test_batch_norms_are_folded_in_a_copy_with_the_same_probabilities():
    """Predictor(fold_norms=True), as `from_bundle` builds it, runs a copy of the network with its batch norms
    folded into the convolutions: the same probabilities, and the caller's model (a bundle's, maybe saved or
    trained further) is untouched."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from attention3d import create_model
    from pipeline.config import InferenceConfig
    from pipeline.predict import Predictor
    from tests.attention3d.test_fusion import _randomise_statistics

    torch.manual_seed(0)
    model = create_model(
        "attention_unet", in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2], norm="batch"
    )
    _randomise_statistics(model)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(1, 1, 40, 36, 20)
    out = {}
    for fold in (False, True):
        predictor = Predictor(
            model, PRE, patch_size=(32, 32, 16), inference=InferenceConfig(), precision="fp32", fold_norms=fold
        )
        assert any(isinstance(m, _BatchNorm) for m in predictor.model.modules()) is not fold
        out[fold], _ = predictor.predict_probabilities(image)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-4)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_postprocess_rule_naming_an_unknown_class_is_refused_when_the_predictor_is_built(bundle_dir, tmp_path):
    from pipeline.bundle import load_bundle
    from pipeline.config import InferenceConfig, PostprocessConfig
    from pipeline.errors import Seg3dError
    from pipeline.predict import Predictor

    folder = shutil.copytree(bundle_dir, tmp_path / "bundle")
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["postprocess"]["inside"] = {"tumour": "pancreas"}  # this model's tumour class is called "cancer"
    (folder / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    bundle = load_bundle(folder)
    with pytest.raises(Seg3dError, match=r"names 'tumour', which is not a class.*classes are pancreas, cancer"):
        Predictor.from_bundle(bundle)
    assert Predictor.from_bundle(bundle, postprocess=False).postprocessing is None  # --no-postprocess still runs
    fixed = PostprocessConfig(inside={"cancer": "pancreas"})
    predictor = Predictor(
        bundle.model,
        pre=bundle.preprocessing,
        patch_size=(32, 32, 16),
        inference=InferenceConfig(),
        postprocessing=fixed,
    )
    assert predictor.postprocessing is fixed


def test_in_bf16_the_first_block_sees_the_intensities_in_fp32():
    """bf16 keeps 8 bits of mantissa: under autocast the image itself and the first features would be rounded
    before their sums (on the 512 x 512 x 200 phantom that moved the pancreas mask to Dice 0.987 of fp32's).
    from_bundle's Predictor runs the first block's convolutions in fp32 (each output exactly the fp32
    convolution's), the later ones in bf16; weights, keys and deep copies are unchanged, and fp32 and training
    models are left alone."""
    import copy

    from attention3d import create_model
    from pipeline.config import InferenceConfig
    from pipeline.predict import Predictor

    torch.manual_seed(0)
    model = create_model("attention_unet", in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2]).eval()
    plain = copy.deepcopy(model)

    def build(precision: str, fp32_first_block: bool) -> Predictor:
        net = copy.deepcopy(model)
        return Predictor(net, PRE, patch_size=(32, 32, 16), inference=InferenceConfig(), precision=precision,
                         fp32_first_block=fp32_first_block)  # fmt: skip

    def convs(net: torch.nn.Module) -> list[torch.nn.Conv3d]:
        return [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]

    bf16 = build("bf16", fp32_first_block=True)
    first = convs(bf16.model.encoders[0])
    assert len(first) == 2 and all(type(m).__name__ == "Fp32Conv3d" for m in first)
    assert all(type(m) is torch.nn.Conv3d for m in convs(bf16.model) if all(m is not f for f in first))
    x = 0.3 + 1e-3 * torch.randn(1, 1, 32, 32, 16)  # soft tissue: small differences on a large value
    with torch.no_grad():
        exact = plain.encoders[0](x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, rounded = bf16.model.encoders[0](x), plain.encoders[0](x)
    assert ours.dtype == torch.float32 and torch.equal(ours, exact)
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - exact).abs().max() > 1e-4  # what it avoids
    assert list(bf16.model.state_dict()) == list(plain.state_dict())
    assert [type(m) for m in convs(copy.deepcopy(bf16.model))] == [type(m) for m in convs(bf16.model)]
    for precision, fp32_first_block in (("fp32", True), ("bf16", False)):
        untouched = build(precision, fp32_first_block).model
        assert all(type(m) is torch.nn.Conv3d for m in convs(untouched))

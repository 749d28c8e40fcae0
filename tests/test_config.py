"""VSMConfig: validation, serialisation, presets with the published shapes."""

import json

import pytest
import torch
from transformers import AutoConfig

from configuration_vsm import PRESETS, VSMConfig


def comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_round_trip_is_equal(tmp_path):
    config = VSMConfig.from_preset("tiny", dense_feature_source="shared", dice_loss_weight=1.5)
    config.save_pretrained(tmp_path)
    reloaded = VSMConfig.from_pretrained(tmp_path)
    assert comparable(reloaded) == comparable(config)
    assert reloaded.dense_feature_source == "shared" and reloaded.dice_loss_weight == 1.5
    assert type(reloaded.text_config).__name__ == "LlamaConfig"
    assert type(reloaded.sam_config).__name__ == "SamConfig"
    assert type(reloaded.detector_config).__name__ == "OwlViTConfig"
    # AutoConfig finds the registered class, and Janus-Pro's name for the LM config is an alias.
    assert comparable(AutoConfig.from_pretrained(tmp_path)) == comparable(config)
    assert reloaded.language_config is reloaded.text_config


def test_language_config_keyword_is_accepted():
    config = VSMConfig(language_config={"model_type": "llama", "hidden_size": 64, "vocab_size": 33000})
    assert config.text_config.hidden_size == 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dense_feature_source": "pixels"}, "dense_feature_source"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
        ({"image_attention": "full"}, "image_attention"),
        ({"bidirectional_image_heads": 9}, "between 0 and the LM's 8 attention heads"),
        ({"image_scans": ["row", "diagonal"]}, "image_scans"),
        ({"image_scans": ["row", "row"]}, "image_scans"),
        ({"image_scans": []}, "image_scans"),
        ({"image_scans": ["row", "column"]}, "one raster scan"),  # the tiny preset's column-causal attention
        ({"mask_refiner_dilations": [1, 2]}, "one dilation >= 1 per convolution"),
        ({"mask_refiner_stride": 0}, "mask_refiner_stride"),
        ({"mask_refiner_stride": 2, "mask_refiner_depth": 2, "mask_refiner_dilations": None}, "depth. >= 3"),
        ({"mask_refiner_prompted": True, "mask_refiner_depth": 1, "mask_refiner_dilations": None}, "depth. >= 2"),
        ({"conv_stem_channels": 32, "conv_stem_groups": 3}, "divisible by `conv_stem_groups`"),
        ({"conv_stem_channels": 32, "conv_stem_depth": -1}, "conv_stem_depth"),
        ({"seg_token_index": 3}, "distinct"),
        ({"loc_token_index": 5000}, "outside the LM vocabulary"),
        ({"seg_token_index": 5000}, "outside the LM vocabulary"),
        ({"projector_type": "mlp3x"}, "projector_type"),
        ({"dense_projection_type": "conv"}, "dense_projection_type"),
        ({"mask_upscaling": "nearest"}, "mask_upscaling"),
    ],
)
def test_invalid_fields_raise_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        VSMConfig.from_preset("tiny", **overrides)


def test_image_scans_take_lm_positions_and_need_a_plain_patch_grid():
    one_scan = VSMConfig.from_preset("tiny")
    two_scans = VSMConfig.from_preset("tiny", image_scans=("row", "column"), image_attention="causal")
    assert VSMConfig.from_preset("janus-pro-1b").image_scans == ["row"]  # pretrained VLMs read raster order
    assert one_scan.image_scans == ["row"] and one_scan.num_image_tokens == one_scan.num_image_patches == 64
    assert two_scans.image_scans == ["row", "column"] and two_scans.num_image_tokens == 2 * 64
    with pytest.raises(ValueError, match="CLS position"):
        VSMConfig.from_preset("llava-1.5-7b", image_scans=["column"], vision_feature_select_strategy="full")
    assert VSMConfig.from_preset("llava-1.5-7b", image_scans=["column"]).num_image_tokens == 576  # CLS dropped


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown preset 'janus-9b'"):
        VSMConfig.from_preset("janus-9b")


# Published hyperparameters (sources: deepseek-ai/Janus-Pro-1B and -7B config.json "language_config" and
# "vision_config" (siglip_large_patch16_384); llava-hf/llava-1.5-7b-hf config.json; facebook/sam-vit-base;
# google/owlvit-base-patch16).
PUBLISHED = {
    "janus-pro-1b": dict(hidden=2048, layers=24, heads=16, intermediate=5632, vocab=102400, vision_hidden=1024,
                         vision_layers=24, vision_heads=16, image=384, patch=16, image_tokens=576),
    "janus-pro-7b": dict(hidden=4096, layers=30, heads=32, intermediate=11008, vocab=102400, vision_hidden=1024,
                         vision_layers=24, vision_heads=16, image=384, patch=16, image_tokens=576),
    "llava-1.5-7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32064, vision_hidden=1024,
                         vision_layers=24, vision_heads=16, image=336, patch=14, image_tokens=576),
}
# Parameter counts computed on the meta device (see the issue note); a change in any part shows here.
EXPECTED_PARAMETERS = {"janus-pro-1b": 1_977.2e6, "janus-pro-7b": 7_276.3e6, "llava-1.5-7b": 7_104.7e6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_carry_published_shapes(name):
    config, expected = VSMConfig.from_preset(name), PUBLISHED[name]
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
        expected["hidden"], expected["layers"], expected["heads"])
    assert (text.intermediate_size, text.vocab_size) == (expected["intermediate"], expected["vocab"])
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        expected["vision_hidden"], expected["vision_layers"], expected["vision_heads"])
    assert (vision.image_size, vision.patch_size) == (expected["image"], expected["patch"])
    assert config.num_image_tokens == expected["image_tokens"]
    # SAM ViT-B and its decoder (TwoWayTransformer depth 2, dim 256, MLP 2048, 8 heads, IoU head depth 3).
    decoder = config.sam_config.mask_decoder_config
    assert (decoder.hidden_size, decoder.num_hidden_layers, decoder.mlp_dim, decoder.num_attention_heads,
            decoder.iou_head_depth) == (256, 2, 2048, 8, 3)
    assert config.sam_config.vision_config.hidden_size == 768 and config.prompt_grid_size == 64
    assert config.detector_config.vision_config.patch_size == 16
    assert config.detector_config.vision_config.image_size == 768


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_preset_parameter_counts_on_meta_device(name):
    from transformers import AutoModel, AutoModelForCausalLM

    from modeling_vsm import VSMForCausalLM

    config = VSMConfig.from_preset(name)
    with torch.device("meta"):
        model = VSMForCausalLM(config)
        bare_lm = AutoModelForCausalLM.from_config(config.text_config)
        bare_vision = AutoModel.from_config(config.vision_config)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # The LM and the vision tower are exactly the transformers models of those configs.
    assert count(model.model.language_model) + count(model.lm_head) == count(bare_lm)
    assert count(model.model.vision_tower) == count(bare_vision)
    assert count(model) == pytest.approx(EXPECTED_PARAMETERS[name], rel=1e-3)


def test_presets_serialise(tmp_path):
    for name in PRESETS:
        path = tmp_path / name
        VSMConfig.from_preset(name).save_pretrained(path)
        saved = json.loads((path / "config.json").read_text())
        assert saved["model_type"] == "vsm"
        assert comparable(VSMConfig.from_pretrained(path)) == comparable(VSMConfig.from_preset(name))


def test_token_layouts_of_converted_checkpoints():
    """LISA: no `<loc>` (no box heads); SEAL: one token for a mask and a box; both: the image placeholder after the
    LM's rows (never embedded)."""
    from modeling_vsm import VSMForCausalLM

    lisa = VSMConfig.from_preset("tiny", loc_token_index=None, image_token_index=1024)
    assert not lisa.has_box_heads
    model = VSMForCausalLM(lisa)
    assert model.class_head is None and model.box_head is None and model.text_hidden_fcs_det is None
    seal = VSMConfig.from_preset("tiny", loc_token_index=4)  # the `<SEG>` id
    assert seal.has_box_heads and seal.seg_token_index == seal.loc_token_index

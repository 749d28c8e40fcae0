"""`from_components`: a VSM composed from tiny random transformers checkpoints (Janus-Pro, LLaVA, SAM, OWL-ViT)
saved in the test reproduces each component's own outputs, for every dense-feature source."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (
    CLIPImageProcessor,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessor,
    JanusProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OwlViTConfig,
    OwlViTForObjectDetection,
    PreTrainedTokenizerFast,
    SamConfig,
    SamModel,
)

from configuration_vsm import VSMConfig
from configuration_vsm.configuration_vsm import PRESETS
from conftest import run_in_clean_process
from modeling_vsm import VSMForCausalLM
from processing_vsm import VSMProcessor, tiny_tokenizer_corpus

LOGIT_TOLERANCE = 1e-4
TOKENIZER_VOCAB = 320
LM = {  # a really tiny Llama, shared by the two VLMs
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
JANUS_IMAGE_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
JANUS_SPARE_ROWS = 8  # Janus-Pro's embedding has more rows than its tokenizer has tokens


def chat_template(image_token: str) -> str:
    return (
        "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}" + image_token + "{% else %}{{ p['text'] }}{% endif %}"
        "{% endfor %}{% endif %}\n{% endfor %}"
    )


def train_tokenizer(special_tokens, named_tokens=None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (no `<SEG>` / `<loc>`), as a pretrained VLM's tokenizer would be."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(tiny_tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=named_tokens or {}, padding_side="left")


def save_janus(folder, tie_word_embeddings=False):
    """A tiny random Janus-Pro (with its VQ image-generation parts) and its processor."""
    tokenizer = train_tokenizer(["<pad>", "<s>", "</s>", *JANUS_IMAGE_TOKENS.values()], JANUS_IMAGE_TOKENS)
    janus = JanusForConditionalGeneration(JanusConfig(
        text_config={**LM, "vocab_size": len(tokenizer) + JANUS_SPARE_ROWS, "tie_word_embeddings": tie_word_embeddings},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
                       "patch_size": 8, "projection_dim": LM["hidden_size"], "mlp_ratio": 2.0, "num_image_tokens": 16},
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 32, "base_channels": 32, "channel_multiplier": [1],
                   "num_res_blocks": 1, "num_patches": 4, "projection_dim": 64, "image_token_embed_dim": 64},
        image_token_id=tokenizer.convert_tokens_to_ids(JANUS_IMAGE_TOKENS["image_token"]),
        tie_word_embeddings=tie_word_embeddings,
    ))
    janus.save_pretrained(folder)
    JanusProcessor(image_processor=JanusImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_image_tokens=16, chat_template=chat_template("<image_placeholder>")).save_pretrained(folder)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """Folders of a tiny random Janus-Pro, LLaVA, SAM and OWL-ViT, each with its processor where it has one."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    save_janus(root / "janus")

    llava_tokenizer = train_tokenizer(["<pad>", "<s>", "</s>", "<image>"], {"image_token": "<image>"})
    llava = LlavaForConditionalGeneration(LlavaConfig(
        text_config={**LM, "vocab_size": len(llava_tokenizer)},  # no spare rows: the vocabulary must grow
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 28, "patch_size": 7, "projection_dim": 16},
        image_token_index=llava_tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    ))
    llava.save_pretrained(root / "llava")
    clip_images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=clip_images, tokenizer=llava_tokenizer, patch_size=7, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=chat_template("<image>")).save_pretrained(root / "llava")

    save_sam_and_owlvit(root)
    return root


def save_sam_and_owlvit(root):
    """A tiny random SamModel (`root/sam`) and OwlViTForObjectDetection (`root/owlvit`) of the tiny preset's shapes."""
    SamModel(SamConfig(**PRESETS["tiny"]["sam_config"])).save_pretrained(root / "sam")
    detector = PRESETS["tiny"]["detector_config"]
    OwlViTForObjectDetection(OwlViTConfig(
        text_config={**detector["text_config"], "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config=detector["vision_config"], projection_dim=detector["projection_dim"],
    )).save_pretrained(root / "owlvit")


def build(components, vlm="janus", source="shared"):
    kwargs = {"vlm": components / vlm, "sam": components / "sam", "detector": components / "owlvit",
              "dense_feature_source": source}
    return VSMForCausalLM.from_components(**kwargs), VSMProcessor.from_components(**kwargs)


def image(height=40, width=30, seed=0):
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy()


def prompt(processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Please segment the red shape. "}, {"type": "image"}]}]
    return processor.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("vlm, vlm_class", [("janus", JanusForConditionalGeneration), ("llava", LlavaForConditionalGeneration)])
def test_text_logits_equal_the_vlm(components, vlm, vlm_class):
    model, processor = build(components, vlm)
    original = vlm_class.from_pretrained(components / vlm).eval()
    inputs = processor(images=[image()], text=[prompt(processor)], return_tensors="pt")
    with torch.no_grad():
        expected = original(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    # The new tokens' columns are new (mean rows); every column the VLM had is reproduced.
    new_ids = [model.config.seg_token_index, model.config.loc_token_index]
    kept = [i for i in range(expected.shape[-1]) if i not in new_ids]
    assert (logits[..., kept] - expected[..., kept]).abs().max() <= LOGIT_TOLERANCE
    # `<SEG>` / `<loc>` are single ids, and their rows are the mean of the rows of the tokens the tokenizer had.
    original_tokens = len(processor.tokenizer) - 2
    for weight in (model.get_input_embeddings().weight, model.lm_head.weight):
        mean_row = weight[:original_tokens].mean(dim=0)
        assert torch.allclose(weight[new_ids], mean_row.expand(2, -1), atol=1e-6)
    assert processor.seg_token_id == model.config.seg_token_index and processor.loc_token_id == model.config.loc_token_index
    assert processor.image_token_id == model.config.image_token_index == original.config.image_token_id


def test_tied_janus_stays_tied(components, tmp_path):
    """A VLM whose `lm_head` is its input embedding gives a VSM with the same tying (and the same logits)."""
    torch.manual_seed(1)
    save_janus(tmp_path / "tied", tie_word_embeddings=True)
    model = VSMForCausalLM.from_components(vlm=tmp_path / "tied", sam=components / "sam")
    original = JanusForConditionalGeneration.from_pretrained(tmp_path / "tied").eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[1, 7, 9, 11]])
    kept = [i for i in range(original.config.text_config.vocab_size)
            if i not in (model.config.seg_token_index, model.config.loc_token_index)]
    with torch.no_grad():
        difference = model(input_ids=ids).logits - original(input_ids=ids).logits
    assert difference[..., kept].abs().max() <= LOGIT_TOLERANCE


def test_processor_tokenizes_like_the_vlm_processor(components):
    """The VSM processor expands the VLM's image token as the VLM's own processor does (Janus-Pro wraps each
    image in `<begin_of_image>` ... `<end_of_image>`), with the VLM's chat template."""
    from transformers import AutoProcessor

    for vlm in ("janus", "llava"):
        _, processor = build(components, vlm)
        original = AutoProcessor.from_pretrained(components / vlm)
        text = prompt(processor)
        assert text == prompt(original)
        ours = processor(images=[image(28, 28)], text=[text], return_tensors="pt")["input_ids"]
        theirs = original(images=[image(28, 28)], text=[text], return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert torch.equal(ours, theirs), vlm


def test_vocabulary_grows_for_llava_and_keeps_janus_spare_rows(components):
    janus, _ = build(components, "janus")
    llava, _ = build(components, "llava")
    janus_config = JanusConfig.from_pretrained(components / "janus")
    llava_config = LlavaConfig.from_pretrained(components / "llava")
    assert janus.config.text_config.vocab_size == janus_config.text_config.vocab_size  # new ids in spare rows
    assert llava.config.text_config.vocab_size == llava_config.text_config.vocab_size + 2
    assert llava.lm_head.weight.shape[0] == llava.get_input_embeddings().weight.shape[0] == llava_config.text_config.vocab_size + 2


def test_sam_source_masks_equal_sam_model(components):
    """The mask decoder fed SamModel's own box-prompt embedding over the VSM's SAM encoder gives SamModel's masks."""
    model, processor = build(components, source="sam")
    sam = SamModel.from_pretrained(components / "sam").eval()
    dense_pixels = processor(images=[image()], return_tensors="pt")["dense_pixel_values"]  # (1, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 8.0, 40.0, 50.0], [10.0, 2.0, 60.0, 30.0]]])  # (1, 2 prompts, 4) xyxy pixels
    with torch.no_grad():
        expected = sam(pixel_values=dense_pixels, input_boxes=boxes, multimask_output=False)
        sparse, _ = sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes, input_masks=None)
        grid = model.get_dense_features(None, None, None, model.get_dense_encoder_outputs(dense_pixels))  # (1, g, g, D)
        masks, ious = model.predict_masks(grid, sparse[0][:, None], torch.zeros(2, dtype=torch.long))
    assert (masks - expected.pred_masks[0, :, 0]).abs().max() <= LOGIT_TOLERANCE
    assert (ious - expected.iou_scores[0, :, 0]).abs().max() <= LOGIT_TOLERANCE


def test_detector_source_boxes_equal_owlvit(components):
    """OWL-ViT's heads on the VSM's OWL-ViT features, given OWL-ViT's text query embedding, give its boxes and logits."""
    model, processor = build(components, source="detector")
    owlvit = OwlViTForObjectDetection.from_pretrained(components / "owlvit").eval()
    dense_pixels = processor(images=[image()], return_tensors="pt")["dense_pixel_values"]  # (1, 3, 64, 64)
    query_ids = torch.tensor([[3, 5, 9, 1]])  # one text query (OWL-ViT masks a query whose first id is 0)
    with torch.no_grad():
        expected = owlvit(input_ids=query_ids, pixel_values=dense_pixels)
        features = model.get_dense_encoder_outputs(dense_pixels).last_hidden_state  # (1, g, g, D)
        class_logits, boxes = model.predict_boxes(features, expected.text_embeds[0], torch.zeros(1, dtype=torch.long))
    assert (features - expected.image_embeds).abs().max() <= LOGIT_TOLERANCE
    assert (boxes[0] - expected.pred_boxes[0]).abs().max() <= LOGIT_TOLERANCE
    assert (class_logits[0] - expected.logits[0, :, 0]).abs().max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("source, present, absent", [
    ("shared", {"vision_to_dense"}, {"lm_to_dense", "dense_encoder", "detector_to_dense"}),
    ("lm", {"lm_to_dense"}, {"vision_to_dense", "dense_encoder", "detector_to_dense"}),
    ("sam", {"dense_encoder"}, {"vision_to_dense", "lm_to_dense", "detector_to_dense"}),
    ("detector", {"dense_encoder", "detector_to_dense"}, {"vision_to_dense", "lm_to_dense"}),
])
def test_each_source_builds_only_its_modules(components, source, present, absent):
    model, _ = build(components, source=source)
    top_level = {key.split(".")[0] for key in model.state_dict()}
    assert present <= top_level and not absent & top_level
    sam = SamModel.from_pretrained(components / "sam")
    decoder = {k: v for k, v in sam.state_dict().items() if k.startswith("mask_decoder.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoder.items())
    if source == "sam":
        encoder = {k: v for k, v in sam.state_dict().items() if k.startswith("vision_encoder.")}
        assert all(torch.equal(model.state_dict()["dense_encoder." + k], v) for k, v in encoder.items())


def test_mismatched_components_fail_naming_both_sides(components, tmp_path):
    with pytest.raises(ValueError, match="Unknown VLM architecture 'sam'.*janus or llava"):
        VSMForCausalLM.from_components(vlm=components / "sam", sam=components / "sam", tokenizer=object())
    with pytest.raises(ValueError, match="`detector` must be an OWL-ViT.*got model_type 'sam'"):
        VSMForCausalLM.from_components(vlm=components / "janus", sam=components / "sam", detector=components / "sam")
    config = PRESETS["tiny"]["sam_config"]
    wide_sam = SamConfig(**{**config, "vision_config": {**config["vision_config"], "output_channels": 32}})
    SamModel(wide_sam).save_pretrained(tmp_path / "sam32")
    with pytest.raises(ValueError, match=r"SAM image embeddings are 32 wide.*mask decoder reads 64"):
        VSMForCausalLM.from_components(vlm=components / "janus", sam=tmp_path / "sam32")
    with pytest.raises(ValueError, match=r"SAM image encoder gives 32-wide embeddings.*mask decoder reads 64"):
        VSMConfig.from_preset("tiny", dense_feature_source="sam", sam_config=wide_sam)
    with pytest.raises(ValueError, match="needs a `detector`"):
        VSMForCausalLM.from_components(vlm=components / "janus", sam=components / "sam", dense_feature_source="detector")


BUILT_FOLDER_SCRIPT = """
    folder, inputs_path, outputs_path = sys.argv[2:5]
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = load_file(inputs_path)
    text = str(bytes(inputs["text"].tolist()), "utf-8")
    batch = processor(images=[inputs["image"].numpy()], text=[text], return_tensors="pt")
    batch.pop("original_sizes")
    with torch.no_grad():
        logits = model(**batch).logits
    save_file({"logits": logits, "input_ids": batch["input_ids"]}, outputs_path)
"""


@pytest.mark.parametrize("source", ["sam"])
def test_vsm_build_folder_loads_in_a_clean_process(components, tmp_path, source):
    from safetensors.torch import load_file, save_file

    from modeling_vsm.cli import main

    folder = tmp_path / "built"
    assert main(["build", "--vlm", str(components / "janus"), "--sam", str(components / "sam"), "--detector",
                 str(components / "owlvit"), "--dense-feature-source", source, "--output-dir", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["dense_feature_source"] == source and "AutoModelForCausalLM" in config["auto_map"]
    model, processor = build(components, source=source)
    text, picture = prompt(processor), image()
    save_file({"text": torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8), "image": torch.from_numpy(picture)},
              tmp_path / "inputs.safetensors")
    run_in_clean_process(BUILT_FOLDER_SCRIPT, [folder, tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"],
                         tmp_path)
    remote = load_file(tmp_path / "outputs.safetensors")
    batch = processor(images=[picture], text=[text], return_tensors="pt")
    batch.pop("original_sizes")
    with torch.no_grad():
        local = model(**batch).logits
    assert torch.equal(remote["input_ids"], batch["input_ids"])
    assert torch.allclose(remote["logits"], local, rtol=1e-5, atol=1e-6)


def test_vsm_build_reports_a_bad_component_in_one_line(components, tmp_path, capsys):
    from modeling_vsm.cli import main

    code = main(["build", "--vlm", str(components / "sam"), "--sam", str(components / "sam"), "--output-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "Unknown VLM architecture 'sam'" in error


def test_real_shapes_map_onto_the_presets():
    """Janus-Pro-1B's and LLaVA-1.5-7B's published shapes (config only, no weights) give the presets' towers."""
    from configuration_vsm.configuration_vsm import SAM_VIT_B

    sam = SamConfig(**SAM_VIT_B)
    janus_text = PRESETS["janus-pro-1b"]["text_config"]
    janus = JanusConfig(text_config=janus_text, vision_config={"projection_dim": janus_text["hidden_size"]})
    llava = LlavaConfig(text_config=PRESETS["llava-1.5-7b"]["text_config"])
    for name, vlm_config in (("janus-pro-1b", janus), ("llava-1.5-7b", llava)):
        built = VSMConfig.from_component_configs(vlm_config, sam, None, "sam")
        preset = VSMConfig.from_preset(name, dense_feature_source="sam")
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size"):
            assert getattr(built.vision_config, field) == getattr(preset.vision_config, field), (name, field)
        assert built.vision_config.model_type == preset.vision_config.model_type
        assert built.num_image_tokens == preset.num_image_tokens and built.image_token_index == preset.image_token_index
        assert built.vision_feature_layer == preset.vision_feature_layer
        assert built.sam_config.to_dict() == preset.sam_config.to_dict()

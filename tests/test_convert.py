"""`vsm convert`: tiny random checkpoints in the published LISA and SEAL layouts (`original_checkpoints.py`,
`original_seal.py`: the original key names, `.bin` shards + index, config.json fields and 4.31 tokenizer files)
become VSM folders that compute what the original code computes (re-implemented there from LISA's and SEAL's
code, with Meta's `segment_anything`, transformers' CLIP / Llama / OWL-ViT): the same prompt ids, text logits, mask
logits at the original image size, boxes and scores, and the same generated tokens."""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_in_clean_process
from original_checkpoints import install_torchvision_stand_in

install_torchvision_stand_in()  # Meta's segment_anything imports torchvision's PIL helpers (never installed here)
pytest.importorskip("segment_anything", reason="the reference SAM (pip install -e '.[dev]')")
pytest.importorskip("sentencepiece", reason="the original tokenizers are sentencepiece models (pip install -e '.[convert]')")

from original_checkpoints import LisaReference, write_tiny_clip, write_tiny_lisa  # noqa: E402
from original_seal import SEAL_ANSWER, SealReference, write_tiny_seal  # noqa: E402

from modeling_vsm import VSMForCausalLM  # noqa: E402
from modeling_vsm.convert import ConversionError, convert  # noqa: E402
from processing_vsm import VSMProcessor  # noqa: E402

TOLERANCE = 1e-4
LISA_QUESTION = "What is the red object in this image? Please output segmentation mask."
SEAL_QUESTION = "Please locate the red car in this image."
IMAGE_SIZES = ((40, 56), (50, 30))  # (h, w): wide and tall, so both crops / stretches are exercised
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder in the original ids


def random_image(height, width, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(processor, question, answer=None) -> str:
    """The converted processor's prompt: the image before the question, as LLaVA-v1's templates put it."""
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    from modeling_vsm.training import attach_image

    return processor.apply_chat_template(attach_image(messages, processor), tokenize=False,
                                         add_generation_prompt=answer is None)


def as_original_ids(ids, image_token_id) -> list:
    """VSM ids with the expanded image as LLaVA's one -200."""
    collapsed = []
    for token in ids:
        if token == image_token_id:
            if collapsed and collapsed[-1] == IMAGE_TOKEN_INDEX:
                continue
            token = IMAGE_TOKEN_INDEX
        collapsed.append(token)
    return collapsed


def clipped(boxes_xyxy, height, width):
    """SEAL's pixel boxes as VSM reports them: clipped to the image (SEAL leaves a box that overhangs the border)."""
    upper = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.minimum(boxes_xyxy.float().reshape(-1, 4).clamp(min=0), upper)


def model_inputs(processor, image, text):
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    return inputs, {key: value for key, value in inputs.items() if key != "original_sizes"}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_tiny_clip(folder)
    return folder


def converted(source, original, clip_folder, output):
    folder = convert(source, original, output, vision_tower=str(clip_folder))
    return types.SimpleNamespace(original=original, folder=folder, model=VSMForCausalLM.from_pretrained(folder).eval(),
                                 processor=VSMProcessor.from_pretrained(folder))


def converted_lisa(variant, root, clip_folder):
    # seed 2: every variant's tiny mask has foreground (a mask that is empty everywhere proves little)
    write_tiny_lisa(root / "original", variant=variant, vision_tower=str(clip_folder), seed=2)
    result = converted("lisa", root / "original", clip_folder, root / "vsm")
    result.reference = LisaReference(root / "original", vision_tower=str(clip_folder))
    return result


@pytest.fixture(scope="module", params=["7b", "13b", "plus"])
def lisa(request, tmp_path_factory, clip_folder):
    """LISA-7B-v1's layout (`<im_patch>` in the vocabulary, `[SEG]` last), LISA-13B-llama2-v1's (`[SEG]` first) and
    LISA++'s (LLaVA-1.5 projector, no `<im_start>` / `<im_end>`)."""
    return converted_lisa(request.param, tmp_path_factory.mktemp(f"lisa-{request.param}"), clip_folder)


@pytest.fixture(scope="module")
def lisa_7b(tmp_path_factory, clip_folder):
    return converted_lisa("7b", tmp_path_factory.mktemp("lisa-7b"), clip_folder)


@pytest.fixture(scope="module")
def seal(tmp_path_factory, clip_folder):
    root = tmp_path_factory.mktemp("seal")
    write_tiny_seal(root / "original", vision_tower=str(clip_folder))
    result = converted("seal", root / "original", clip_folder, root / "vsm")
    result.reference = SealReference(root / "original", vision_tower=str(clip_folder))
    return result


# ---- fidelity ---------------------------------------------------------------------------------


def test_lisa_prompt_logits_and_masks_equal_the_original(lisa):
    model, processor, reference = lisa.model, lisa.processor, lisa.reference
    assert model.config.dense_feature_source == "sam" and not model.config.has_box_heads
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        image = random_image(height, width, seed)
        inputs, kwargs = model_inputs(processor, image, chat(processor, LISA_QUESTION, "Sure, it is [SEG]."))
        original_ids = reference.prompt_ids(LISA_QUESTION, answer="Sure, it is [SEG].")
        assert as_original_ids(inputs["input_ids"][0].tolist(), processor.image_token_id) == original_ids
        expected = reference.forward(image, original_ids)
        with torch.no_grad():
            outputs = model(**kwargs)
        assert outputs.logits.shape == expected["logits"].shape
        assert torch.allclose(outputs.logits, expected["logits"], atol=TOLERANCE)
        masks = processor.post_process_masks(outputs.pred_masks[0], height, width)  # (1, h, w) logits
        assert masks.shape == expected["mask_logits"].shape == (1, height, width)
        assert torch.allclose(masks, expected["mask_logits"], atol=TOLERANCE)


def test_lisa_generate_gives_the_original_tokens_and_masks(lisa):
    model, processor, reference = lisa.model, lisa.processor, lisa.reference
    image = random_image(*IMAGE_SIZES[0])
    inputs, kwargs = model_inputs(processor, image, chat(processor, LISA_QUESTION))
    new_ids, expected_masks = reference.generate(image, reference.prompt_ids(LISA_QUESTION), max_new_tokens=8)
    outputs = model.generate(**kwargs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert outputs.sequences[0, outputs.prompt_length:].tolist() == new_ids
    assert lisa.model.config.seg_token_index in new_ids  # the tiny LM answers with a mask
    masks = processor.post_process_masks(outputs.pred_masks[0], *IMAGE_SIZES[0])
    assert torch.allclose(masks, expected_masks, atol=TOLERANCE)
    result = processor.post_process_generation(outputs, target_sizes=inputs["original_sizes"])[0]
    assert "[SEG]" in result["text"] and torch.equal(result["masks"], expected_masks > 0)


def test_seal_prompt_logits_boxes_and_masks_equal_the_original(seal):
    model, processor, reference = seal.model, seal.processor, seal.reference
    assert model.config.seg_token_index == model.config.loc_token_index  # [LOC]: one token, a box and a mask
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        image = random_image(height, width, seed)
        inputs, kwargs = model_inputs(processor, image, chat(processor, SEAL_QUESTION, SEAL_ANSWER))
        original_ids = reference.prompt_ids(SEAL_QUESTION, answer=SEAL_ANSWER)
        assert as_original_ids(inputs["input_ids"][0].tolist(), processor.image_token_id) == original_ids
        expected = reference.forward(image, original_ids)
        with torch.no_grad():
            outputs = model(**kwargs)
        assert torch.allclose(outputs.logits, expected["logits"], atol=TOLERANCE)
        masks = processor.post_process_masks(outputs.pred_masks[0], height, width)
        assert torch.allclose(masks, expected["mask_logits"], atol=TOLERANCE)
        result = processor.post_process_generation(
            types.SimpleNamespace(sequences=inputs["input_ids"], pred_masks=outputs.pred_masks,
                                  pred_boxes=outputs.pred_boxes, box_scores=outputs.box_scores),
            target_sizes=inputs["original_sizes"])[0]
        best = expected["best_index"]
        expected_box = expected["pred_boxes"][torch.arange(len(best)), best]  # (n, 4) cxcywh on the stretched view
        assert torch.allclose(outputs.pred_boxes[0], expected_box, atol=TOLERANCE)
        assert torch.allclose(result["boxes"], clipped(expected["box_xyxy"], height, width), atol=TOLERANCE)
        assert torch.allclose(result["scores"], expected["box_score"].float().flatten(), atol=TOLERANCE)


def test_seal_generate_gives_the_original_tokens_box_and_mask(seal):
    model, processor, reference = seal.model, seal.processor, seal.reference
    image = random_image(*IMAGE_SIZES[1])
    inputs, kwargs = model_inputs(processor, image, chat(processor, SEAL_QUESTION))
    expected = reference.generate(image, reference.prompt_ids(SEAL_QUESTION), max_new_tokens=8)
    outputs = model.generate(**kwargs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert outputs.sequences[0, outputs.prompt_length:].tolist() == list(expected["new_ids"])
    result = processor.post_process_generation(outputs, target_sizes=inputs["original_sizes"])[0]
    assert "[LOC]" in result["text"]
    assert torch.allclose(result["boxes"], clipped(expected["box_xyxy"], *IMAGE_SIZES[1]), atol=TOLERANCE)
    masks = processor.post_process_masks(outputs.pred_masks[0], *IMAGE_SIZES[1])
    assert torch.allclose(masks, expected["mask_logits"], atol=TOLERANCE)


def test_a_batch_equals_one_image_at_a_time(lisa_7b):
    model, processor = lisa_7b.model, lisa_7b.processor
    images = [random_image(*size, seed) for seed, size in enumerate(IMAGE_SIZES)]
    prompts = [chat(processor, LISA_QUESTION), chat(processor, "Where is the dog? Please output segmentation mask.")]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    sizes = batch.pop("original_sizes")
    together = model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    together = processor.post_process_generation(together, target_sizes=sizes)
    for image, prompt, batched in zip(images, prompts, together):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        single_sizes = single.pop("original_sizes")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        alone = processor.post_process_generation(alone, target_sizes=single_sizes)[0]
        assert alone["text"] == batched["text"]
        assert (alone["masks"] != batched["masks"]).float().mean() < 0.01  # float noise at the boundary at most


def test_converted_folders_load_with_remote_code_in_a_clean_process(lisa_7b, seal, tmp_path):
    image_path = tmp_path / "image.png"
    random_image(*IMAGE_SIZES[0]).save(image_path)
    script = """
    import sys
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder, image_path, question, output = sys.argv[2:6]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\\n" + question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.open(image_path)], text=[prompt], return_tensors="pt")
    sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        logits = model(**inputs).logits
    outputs = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(outputs, target_sizes=sizes)[0]
    save_file({"logits": logits.contiguous(), "masks": result["masks"].float().contiguous(),
               "boxes": result["boxes"].contiguous()}, output)
    """
    from safetensors.torch import load_file

    for converted_model, question in ((lisa_7b, LISA_QUESTION), (seal, SEAL_QUESTION)):
        output = tmp_path / f"{converted_model.model.config.dense_feature_source}.safetensors"
        run_in_clean_process(script, [converted_model.folder, image_path, question, output], tmp_path)
        clean = load_file(output)
        processor, model = converted_model.processor, converted_model.model
        inputs, kwargs = model_inputs(processor, Image.open(image_path), chat(processor, question))
        with torch.no_grad():
            assert torch.allclose(clean["logits"], model(**kwargs).logits, atol=1e-5)
        outputs = model.generate(**kwargs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        here = processor.post_process_generation(outputs, target_sizes=inputs["original_sizes"])[0]
        assert torch.equal(clean["masks"].bool(), here["masks"]) and torch.allclose(clean["boxes"], here["boxes"])


# ---- what the converted folder holds ----------------------------------------------------------


def test_converted_folder_is_a_normal_vsm_folder(lisa_7b):
    lisa = lisa_7b
    files = {path.name for path in lisa.folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md",
            "modeling_vsm.py", "configuration_vsm.py", "processing_vsm.py", "generation_config.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((lisa.folder / "config.json").read_text())
    assert config["model_type"] == "vsm" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_vsm.VSMForCausalLM"
    card = (lisa.folder / "README.md").read_text()
    assert str(lisa.original) in card and "license:" in card
    original_config = json.loads((lisa.original / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == original_config["vocab_size"]  # the original rows, no more
    assert lisa.processor.image_token_id >= original_config["vocab_size"]  # the placeholder is never embedded


# ---- full-size key sets on the meta device ----------------------------------------------------


# The published config.json fields that size the LM (LISA-7B-v1's as published; LISA-13B-llama2-v1's and
# seal_vsm_7b's from their LLaVA bases, LLaVA-llama-2-13b-chat-lightning and LLaVA-Lightning-7B-v1-1).
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
LLAMA_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
FULL_SIZE = {  # name: (LM, vocab_size, id of [SEG] / [LOC])
    "lisa-7b-v1": (LLAMA_7B, 32004, 32003),
    "lisa-13b-llama2-v1": (LLAMA_13B, 32003, 32000),
    "seal-vsm-7b": (LLAMA_7B, 32004, 32003),
}
CLIP_VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 224, "patch_size": 14, "projection_dim": 768}
OWLVIT_B16_768 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 768, "patch_size": 16}
SAM_WIDTH, SEAL_GRID, SEAL_OWLVIT_SIZE, SEAL_QUERY_SIZE = 256, 48, 768, 512


def meta_shapes(module, prefix=""):
    return {prefix + key: tuple(value.shape) for key, value in module.state_dict().items()}


def linear_shapes(prefix, in_size, out_size, bias=True):
    return {f"{prefix}.weight": (out_size, in_size), **({f"{prefix}.bias": (out_size,)} if bias else {})}


@pytest.fixture(params=sorted(FULL_SIZE))
def full_size_layout(request):
    """The key set and shapes of a published checkpoint, built on the meta device from the original classes (Meta's
    SAM ViT-H, transformers' Llama and OWL-ViT, SEAL's mask decoder) with the published sizes: no weight allocated."""
    from segment_anything.build_sam import build_sam_vit_h
    from segment_anything.modeling import PromptEncoder
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, OwlViTConfig
    from transformers import OwlViTForObjectDetection

    from original_seal import build_seal_mask_decoder

    name = request.param
    lm, vocab_size, seg_id = FULL_SIZE[name]
    hidden = lm["hidden_size"]
    config_json = {"model_type": "llava", **lm, "num_key_value_heads": lm["num_attention_heads"], "vocab_size": vocab_size,
                   "mm_hidden_size": CLIP_VIT_L14["hidden_size"], "mm_vision_select_layer": -2,
                   "mm_use_im_start_end": True, "mm_vision_tower": "openai/clip-vit-large-patch14",
                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    with torch.device("meta"):
        shapes = meta_shapes(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config_json.items() if k in LlamaConfig().to_dict()})))
        shapes.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (hidden // lm["num_attention_heads"] // 2,)
                       for i in range(lm["num_hidden_layers"])})  # persistent in transformers 4.31: in the shards
        shapes.update(linear_shapes("model.mm_projector", CLIP_VIT_L14["hidden_size"], hidden))
        if name.startswith("lisa"):
            shapes.update(meta_shapes(build_sam_vit_h(), "model.visual_model."))
            shapes.update(linear_shapes("model.text_hidden_fcs.0.0", hidden, hidden))
            shapes.update(linear_shapes("model.text_hidden_fcs.0.2", hidden, SAM_WIDTH))
        else:
            owlvit = OwlViTForObjectDetection(OwlViTConfig(vision_config=OWLVIT_B16_768))
            for part in ("class_head", "box_head", "layer_norm"):
                shapes.update(meta_shapes(getattr(owlvit, part), f"model.owlvit.{part}."))
            shapes.update(meta_shapes(owlvit.owlvit.vision_model, "model.owlvit.vision_model."))
            shapes.update(linear_shapes("model.visual_projection", OWLVIT_B16_768["hidden_size"], SAM_WIDTH, bias=False))
            shapes.update(meta_shapes(PromptEncoder(embed_dim=SAM_WIDTH, image_embedding_size=(SEAL_GRID, SEAL_GRID),
                                                    input_image_size=(SEAL_OWLVIT_SIZE,) * 2, mask_in_chans=16),
                                      "model.prompt_encoder."))
            shapes.update(meta_shapes(build_seal_mask_decoder(SAM_WIDTH, 2048, 8), "model.mask_decoder."))
            for head, size in (("det", SEAL_QUERY_SIZE), ("seg", SAM_WIDTH)):
                shapes.update(linear_shapes(f"model.text_hidden_fcs_{head}.0.0", hidden, hidden))
                shapes.update(linear_shapes(f"model.text_hidden_fcs_{head}.0.2", hidden, size))
        clip_config = CLIPVisionConfig(**CLIP_VIT_L14)
        clip_shapes = meta_shapes(CLIPVisionModel(clip_config))
    ids = {"seg": seg_id, "image": vocab_size}  # `<image>` follows the checkpoint's tokens
    return name, shapes, config_json, clip_shapes, clip_config, ids


def test_full_size_published_layouts_map_onto_the_vsm(full_size_layout):
    from modeling_vsm.convert import build_config, check_layout, plan_weights, TOWER_PREFIX

    name, shapes, config_json, clip_shapes, clip_config, ids = full_size_layout
    source = "seal" if name.startswith("seal") else "lisa"
    check_layout(source, shapes)
    config = build_config(source, config_json, shapes, clip_config, ids["image"], ids["seg"])
    tower = {TOWER_PREFIX + key: shape for key, shape in clip_shapes.items()}
    plan = plan_weights(source, shapes, config, tower)  # raises on any key unused, used twice or unfilled
    dropped = [key for key in shapes if key not in plan.targets]
    assert all(key.endswith(".rotary_emb.inv_freq") for key in dropped)
    assert sorted(plan.targets.values()) == sorted(set(plan.targets.values())) and set(plan.targets.values()) == set(plan.expected)

    def numel(shape):
        return int(np.prod(shape)) if shape else 1

    original = sum(numel(shape) for key, shape in shapes.items() if key not in dropped)
    clip = sum(numel(shape) for shape in clip_shapes.values())
    vsm = sum(numel(shape) for shape in plan.expected.values())
    print(f"{name}: original {original:,} + CLIP tower {clip:,} = VSM {vsm:,}")
    assert vsm == original + clip


# ---- clear errors -----------------------------------------------------------------------------


@pytest.fixture
def tiny_lisa_folder(tmp_path, clip_folder):
    write_tiny_lisa(tmp_path / "original", vision_tower=str(clip_folder))
    return tmp_path / "original"


def test_a_folder_that_is_neither_says_which_keys_are_missing(tmp_path, clip_folder):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava", "mm_vision_tower": str(clip_folder)}))
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2), "vision.weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"Not a LISA checkpoint: missing \['lm_head.weight'"):
        convert("lisa", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_wrong_source_names_the_right_one(tmp_path, clip_folder):
    write_tiny_seal(tmp_path / "seal", vision_tower=str(clip_folder))
    with pytest.raises(ConversionError, match="use --from seal"):
        convert("lisa", tmp_path / "seal", tmp_path / "out")


def test_unknown_keys_are_named(tiny_lisa_folder, tmp_path):
    extra = tiny_lisa_folder / "pytorch_model-00002-of-00002.bin"
    state = torch.load(extra, weights_only=True)
    torch.save({**state, "model.extra_head.weight": torch.zeros(2)}, extra)
    with pytest.raises(ConversionError, match=r"1 unknown keys, e.g. \['model.extra_head.weight'\]"):
        convert("lisa", tiny_lisa_folder, tmp_path / "out")


def test_vision_tower_missing_or_of_the_wrong_width(tiny_lisa_folder, tmp_path):
    with pytest.raises(ConversionError, match="neither a local folder nor a Hub id"):
        convert("lisa", tiny_lisa_folder, tmp_path / "out", vision_tower=str(tmp_path / "no" / "such" / "tower"))
    write_tiny_clip(tmp_path / "narrow", hidden_size=32)
    with pytest.raises(ConversionError, match=r"is 32 wide, but the checkpoint's projector reads 48"):
        convert("lisa", tiny_lisa_folder, tmp_path / "out", vision_tower=str(tmp_path / "narrow"))


def test_a_shard_listed_in_the_index_but_absent(tiny_lisa_folder, tmp_path):
    (tiny_lisa_folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ConversionError, match=r"lists shards that are not in .*pytorch_model-00002-of-00002.bin"):
        convert("lisa", tiny_lisa_folder, tmp_path / "out")


def test_a_tokenizer_without_the_seg_token(tiny_lisa_folder, tmp_path):
    added = json.loads((tiny_lisa_folder / "added_tokens.json").read_text())
    del added["[SEG]"]  # the last id (LISA-7B-v1's layout): the others stay consecutive
    (tiny_lisa_folder / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(ConversionError, match=r"has no \[SEG\] token"):
        convert("lisa", tiny_lisa_folder, tmp_path / "out")


def test_an_existing_output_folder_is_refused_and_a_failure_leaves_nothing(tiny_lisa_folder, tmp_path, monkeypatch):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert("lisa", tiny_lisa_folder, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    import modeling_vsm.convert as convert_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "write_model_card", fail)
    before = set(tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        convert("lisa", tiny_lisa_folder, tmp_path / "out")
    assert set(tmp_path.iterdir()) == before  # no output, no staging folder


def test_cli_errors_are_one_line(tiny_lisa_folder, tmp_path, capsys):
    from modeling_vsm.cli import main

    code = main(["convert", "--from", "seal", "--checkpoint", str(tiny_lisa_folder), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "Not a SEAL checkpoint" in error and "use --from lisa" in error


# ---- the converted folders through the VSM tools ----------------------------------------------


@pytest.fixture(scope="module")
def reasonseg_folder(tmp_path_factory):
    from modeling_vsm.data import export_reasonseg, load_synthetic

    folder = tmp_path_factory.mktemp("reasonseg")
    assert export_reasonseg(load_synthetic("test", num_samples=8, seed=3), folder) >= 4
    return folder


@pytest.mark.parametrize("source", ["lisa", "seal"])
def test_converted_folders_predict_evaluate_train_and_load_in_4_bit(source, lisa_7b, seal, reasonseg_folder, tmp_path):
    from modeling_vsm.cli import main

    converted_model = lisa_7b if source == "lisa" else seal
    folder = converted_model.folder
    image_path = tmp_path / "image.png"
    random_image(37, 61).save(image_path)

    prediction = tmp_path / "prediction.json"
    assert main(["predict", "--model", str(folder), "--image", str(image_path), "--prompt", SEAL_QUESTION if source == "seal"
                 else LISA_QUESTION, "--output", str(prediction), "--overlay", str(tmp_path / "overlay.png")]) == 0
    payload = json.loads(prediction.read_text())
    assert payload["masks"] and all(mask["rle"]["size"] == [37, 61] for mask in payload["masks"])  # the original size
    assert len(payload["boxes"]) == (1 if source == "seal" else 0)
    overlay_width, overlay_height = Image.open(tmp_path / "overlay.png").size  # small images are drawn larger
    assert overlay_width * 37 == overlay_height * 61

    metrics = tmp_path / "eval" / "metrics.json"
    assert main(["eval", "--model", str(folder), "--data", f"reasonseg:{reasonseg_folder}", "--batch-size", "4",
                 "--max-new-tokens", "6", "--no-swap-test", "--output", str(metrics)]) == 0
    summary = json.loads(metrics.read_text())
    assert summary["num_samples"] >= 4 and summary["seg_emission_rate"] == 1.0 and 0 <= summary["giou"] <= 1

    # The mixture has `<loc>` rows: LISA (no box heads) leaves them out; SEAL's [LOC] trains masks and boxes together.
    trained = tmp_path / "lora"
    assert main(["train", "--model", str(folder), "--data", f"synthetic+reasonseg:{reasonseg_folder}", "--train-samples",
                 "40", "--trainable", "lora", "--lora-rank", "4", "--max-steps", "5", "--batch-size", "4", "--no-eval",
                 "--save-steps", "0", "--output-dir", str(trained)]) == 0
    assert np.isfinite(json.loads((trained / "train_metrics.json").read_text())["train_loss"])
    assert VSMForCausalLM.from_pretrained(trained).config.dense_feature_source == converted_model.model.config.dense_feature_source

    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantized = VSMForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)).eval()
    processor = converted_model.processor
    inputs, kwargs = model_inputs(processor, random_image(*IMAGE_SIZES[0]), chat(processor, LISA_QUESTION))
    outputs = quantized.generate(**kwargs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(outputs, target_sizes=inputs["original_sizes"])[0]
    assert result["masks"].shape[1:] == IMAGE_SIZES[0] and all(torch.isfinite(m).all() for m in outputs.pred_masks)


def test_the_card_keeps_the_source_license_through_push(tiny_lisa_folder, tmp_path):
    from hub_cards import render_folder_card

    (tiny_lisa_folder / "README.md").write_text("---\nlicense: llama2\n---\n# LISA\n")
    folder = convert("lisa", tiny_lisa_folder, tmp_path / "lisa-vsm")
    for card in ((folder / "README.md").read_text(), render_folder_card(folder, repo="me/lisa-vsm")):
        assert "license: llama2" in card and str(tiny_lisa_folder) in card and "<image>" not in card.split("```")[0]


def test_the_demo_answers_with_a_converted_folder(seal):
    from modeling_vsm.demo import answer

    text, overlay, details = answer(seal.model, seal.processor, random_image(*IMAGE_SIZES[0]), SEAL_QUESTION, 8)
    assert "[LOC]" in text and len(details["boxes"]) == 1 and details["mask_areas"][0] >= 0
    assert overlay.size[0] * IMAGE_SIZES[0][0] == overlay.size[1] * IMAGE_SIZES[0][1]


def test_bench_measures_a_converted_folder_against_a_shared_encoder(lisa_7b, tmp_path):
    from modeling_vsm.cli import main

    output = tmp_path / "bench.json"
    assert main(["bench", "--model", str(lisa_7b.folder), "--sources", "sam,shared", "--dtypes", "fp32", "--runs", "1",
                 "--warmup", "0", "--new-tokens", "2", "--mask-counts", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    sources = report["dtypes"]["fp32"]["sources"]
    assert report["model"] == str(lisa_7b.folder) and set(sources) == {"sam", "shared"}
    assert all("error" not in result for result in sources.values()), sources
    # LISA's own SAM image encoder is counted in its FLOPs; the shared source has none
    assert sources["sam"]["vsm"]["flops"]["dense_encoder"] > sources["shared"]["vsm"]["flops"]["dense_encoder"]


def test_bfloat16_conversion_keeps_mask_decoding_in_float32(lisa_7b, tmp_path):
    from safetensors import safe_open

    folder = convert("lisa", lisa_7b.original, tmp_path / "bf16", dtype="bfloat16")  # the config's mm_vision_tower
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        dtypes = {key: weights.get_tensor(key).dtype for key in weights.keys()}
    assert dtypes["model.language_model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert all(dtype == torch.float32 for key, dtype in dtypes.items() if key.startswith(("mask_decoder.", "prompt_encoder.")))
    model = VSMForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.bfloat16 and model.mask_decoder.iou_token.weight.dtype == torch.float32
    processor = lisa_7b.processor
    image = random_image(*IMAGE_SIZES[0])
    inputs, kwargs = model_inputs(processor, image, chat(processor, LISA_QUESTION, "Sure, it is [SEG]."))
    with torch.no_grad():
        half, full = model(**kwargs), lisa_7b.model(**kwargs)
    assert half.pred_masks[0].dtype == torch.float32
    agree = (processor.post_process_masks(half.pred_masks[0], *IMAGE_SIZES[0]) > 0) == (
        processor.post_process_masks(full.pred_masks[0], *IMAGE_SIZES[0]) > 0)
    assert agree.float().mean() > 0.9


def test_safetensors_shards_convert_like_bin_shards(lisa_7b, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "safetensors-original"
    shutil.copytree(lisa_7b.original, folder)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        state = torch.load(folder / shard, weights_only=True)
        name = shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file({key: value.contiguous() for key, value in state.items()}, str(folder / name))
        renamed[shard] = name
        (folder / shard).unlink()
    (folder / "pytorch_model.bin.index.json").unlink()
    weight_map = {key: renamed[shard] for key, shard in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    model = VSMForCausalLM.from_pretrained(convert("lisa", folder, tmp_path / "vsm")).eval()
    for name, value in model.state_dict().items():
        assert torch.equal(value, lisa_7b.model.state_dict()[name]), name


def test_a_folder_with_a_tokenizer_json_converts_with_that_tokenizer(lisa_7b, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "fast-tokenizer-original"
    shutil.copytree(lisa_7b.original, folder)
    # tokenizer.json from transformers' own conversion of tokenizer.model (which needs protobuf: a dev dependency)
    AutoTokenizer.from_pretrained(lisa_7b.original).save_pretrained(folder)
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    source = AutoTokenizer.from_pretrained(folder)
    converted_folder = convert("lisa", folder, tmp_path / "vsm")
    processor = VSMProcessor.from_pretrained(converted_folder)
    assert processor.seg_token_id == source.convert_tokens_to_ids("[SEG]") == lisa_7b.model.config.seg_token_index
    text = chat(processor, LISA_QUESTION, "Sure, it is [SEG].")
    ids = processor(images=[random_image(*IMAGE_SIZES[0])], text=[text])["input_ids"][0].tolist()
    expanded = processor.expand_image_tokens(text).replace(processor.image_token, "")  # <im_start><im_end> stay
    expected = source(expanded, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i != processor.image_token_id] == expected


def test_vsm_search_runs_on_a_converted_seal(seal, tmp_path):
    from modeling_vsm.cli import main

    random_image(300, 460).save(tmp_path / "street.png")
    output, overlay = tmp_path / "search.json", tmp_path / "search.png"
    assert main(["search", "--model", str(seal.folder), "--image", str(tmp_path / "street.png"), "--target", "red car",
                 "--minimum-size", "100", "--output", str(output), "--overlay", str(overlay)]) == 0
    result = json.loads(output.read_text())
    assert result["path"][0]["box"] == [0, 0, 460, 300] and result["box"] is not None
    assert Image.open(overlay).size == (460, 300)

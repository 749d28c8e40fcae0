"""Tests of processing_vsm: tokenizer, chat template, image frames, post-processing, remote code."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without an (editable) install too
    sys.path.insert(0, str(REPO_ROOT))

from configuration_vsm import VSMConfig  # noqa: E402
from configuration_vsm.configuration_vsm import (  # noqa: E402
    TINY_BOS_ID,
    TINY_EOS_ID,
    TINY_IMAGE_ID,
    TINY_LOC_ID,
    TINY_PAD_ID,
    TINY_SEG_ID,
)
from processing_vsm import VSMImageProcessor, VSMProcessor, build_tiny_tokenizer  # noqa: E402
from conftest import run_in_clean_process  # noqa: E402


TINY_SIZE = 64
PROMPT = "<s><|user|>segment the red shape\n<image>\n<|assistant|>"
TEXT_ONLY_PROMPT = "<s><|user|>How many shapes are there?\n<|assistant|>"


@pytest.fixture(scope="module")
def processor():
    return VSMProcessor.from_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer(processor):
    return processor.tokenizer


def solid(height, width, value=255, mode="RGB"):
    return Image.new(mode, (width, height), value if mode != "RGB" else (value, value, value))


def noise_image(height=37, width=53, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def first_pixel(processor, image):
    """The normalised RGB value at the frame's top-left pixel, and the whole frame."""
    frame = processor.image_processor(image)["pixel_values"][0]
    return frame[:, 0, 0], frame


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# ============================================================================================
# Tokenizer
# ============================================================================================


def test_special_token_ids_match_config(tokenizer):
    expected = {
        "<pad>": TINY_PAD_ID,
        "<s>": TINY_BOS_ID,
        "</s>": TINY_EOS_ID,
        "<image>": TINY_IMAGE_ID,
        "<SEG>": TINY_SEG_ID,
        "<loc>": TINY_LOC_ID,
        "<|user|>": 6,
        "<|assistant|>": 7,
    }
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    text_config = VSMConfig.from_preset("tiny").text_config
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        text_config.pad_token_id,
        text_config.bos_token_id,
        text_config.eos_token_id,
    )
    config = VSMConfig.from_preset("tiny")
    assert (config.image_token_index, config.seg_token_index, config.loc_token_index) == (3, 4, 5)


def test_vocab_fits_tiny_lm(tokenizer):
    vocab_size = VSMConfig.from_preset("tiny").text_config.vocab_size
    assert len(tokenizer) <= vocab_size
    assert len(tokenizer) > vocab_size - 64, "the tiny tokenizer should use (nearly) all of the LM's rows"
    assert max(tokenizer.get_vocab().values()) < vocab_size


@pytest.mark.parametrize("token", ["<image>", "<SEG>", "<loc>"])
@pytest.mark.parametrize("context", ["{}", "a{}.", " {}", "{}{}", "It is {}.", "red{}shape", "\n{}\n"])
def test_multimodal_tokens_are_single_ids(tokenizer, token, context):
    text = context.replace("{}", token)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert ids.count(token_id) == text.count(token)
    # Nothing else in the encoding spells part of the token.
    rest = tokenizer.decode([i for i in ids if i != token_id])
    assert "<" not in rest and ">" not in rest


def test_domain_words_are_single_tokens(tokenizer):
    for word in ["red", "yellow", "circle", "triangle", "leftmost", "biggest", "smallest", "segment", "shape"]:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_byte_level_encodes_any_text(tokenizer):
    text = "Ünïcödé 🙂 日本語 \t tabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_deterministic_across_processes(tokenizer):
    assert tokenizer_fingerprint(build_tiny_tokenizer()) == tokenizer_fingerprint(tokenizer)
    code = (
        "import hashlib; from processing_vsm import build_tiny_tokenizer; "
        "print(hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == tokenizer_fingerprint(tokenizer)


def test_processor_rejects_a_tokenizer_that_splits_seg(tokenizer):
    assert "segment" in tokenizer.get_vocab()  # a plain-word token: "a segment." encodes it differently
    with pytest.raises(ValueError, match="splits"):
        VSMProcessor(VSMImageProcessor(), tokenizer, num_image_tokens=4, seg_token="segment")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        VSMProcessor(VSMImageProcessor(), tokenizer, num_image_tokens=4, loc_token="<nope>")


def test_from_preset_only_tiny():
    with pytest.raises(ValueError, match="tiny"):
        VSMProcessor.from_preset("janus-pro-1b")


def test_from_preset_tiny_settings(processor):
    config = VSMConfig.from_preset("tiny")
    assert processor.num_image_tokens == config.num_image_tokens == 64  # 8 x 8 patches, one raster scan
    assert processor.image_processor.image_size == config.vision_config.image_size == TINY_SIZE
    assert processor.image_processor.image_mean == [0.5] * 3 and processor.image_processor.image_std == [0.5] * 3
    assert processor.image_processor.dense_image_size is None


# ============================================================================================
# Chat template
# ============================================================================================


def test_chat_template_renders_in_content_order(processor, tokenizer):
    messages = [
        {"role": "system", "content": "You segment shapes."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "segment the red shape\n"}, {"type": "image"}],
        },
        {"role": "assistant", "content": "It is <SEG>."},
        {"role": "user", "content": "Where is the blue circle?"},
    ]
    expected = (
        "<s>You segment shapes.\n<|user|>segment the red shape\n<image>\n<|assistant|>It is <SEG>.</s>"
        "<|user|>Where is the blue circle?\n"
    )
    assert processor.apply_chat_template(messages) == expected
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected + "<|assistant|>"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    image_first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    assert processor.apply_chat_template(image_first) == "<s><|user|><image>what is it?\n"


def test_apply_chat_template_tokenize_with_image(processor):
    image = noise_image()
    content = [{"type": "text", "text": "segment the red shape\n"}, {"type": "image", "image": image}]
    messages = [{"role": "user", "content": content}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True))
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    assert out["input_ids"][0, 0].item() == TINY_BOS_ID and (out["input_ids"] == TINY_BOS_ID).sum() == 1


# ============================================================================================
# Processor __call__
# ============================================================================================


def test_image_token_expansion(processor):
    out = processor(images=noise_image(), text=PROMPT)
    ids = out["input_ids"][0]
    positions = (ids == TINY_IMAGE_ID).nonzero().flatten()
    assert len(positions) == processor.num_image_tokens
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + processor.num_image_tokens))
    assert ids[0].item() == TINY_BOS_ID and (ids == TINY_BOS_ID).sum() == 1
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["pixel_values"].shape == (1, 3, TINY_SIZE, TINY_SIZE) and out["pixel_values"].dtype == torch.float32
    assert out["original_sizes"].tolist() == [[37, 53]]


def test_multiple_images_in_one_sample(processor):
    text = "<s><|user|><image> and <image>\n<|assistant|>"
    out = processor(images=[noise_image(), noise_image(10, 20)], text=text)
    assert (out["input_ids"] == TINY_IMAGE_ID).sum() == 2 * processor.num_image_tokens
    assert out["original_sizes"].tolist() == [[37, 53], [10, 20]]


@pytest.mark.parametrize(
    "images, text, numbers",
    [
        (noise_image(), TEXT_ONLY_PROMPT, ("Sample 0", "0 <image>", "1 image")),
        (None, PROMPT, ("Sample 0", "1 <image>", "0 image")),
        ([noise_image(), noise_image()], PROMPT, ("Sample 0", "1 <image>", "2 image")),
        (noise_image(), "<s><|user|><image><image>\n<|assistant|>", ("Sample 0", "2 <image>", "1 image")),
        ([noise_image(), noise_image()], [PROMPT, TEXT_ONLY_PROMPT], ("Sample 1", "0 <image>", "1 image")),
    ],
)
def test_image_count_errors(processor, images, text, numbers):
    with pytest.raises(ValueError) as info:
        processor(images=images, text=text)
    for piece in numbers:
        assert piece in str(info.value)


def test_batch_with_text_only_sample_and_padding_sides(processor):
    texts = [PROMPT, TEXT_ONLY_PROMPT]
    left = processor(images=[noise_image(), None], text=texts)
    right = processor(images=[noise_image(), None], text=texts, padding_side="right")
    assert left["pixel_values"].shape[0] == 1
    lengths = left["attention_mask"].sum(1)
    assert lengths[0] == left["input_ids"].shape[1] > lengths[1]
    short = lengths[1].item()
    pad = left["input_ids"].shape[1] - short
    # left padding: pads first, the sample's ids at the end
    assert (left["input_ids"][1, :pad] == TINY_PAD_ID).all() and (left["attention_mask"][1, :pad] == 0).all()
    assert (right["input_ids"][1, short:] == TINY_PAD_ID).all() and (right["attention_mask"][1, short:] == 0).all()
    assert torch.equal(left["input_ids"][1, pad:], right["input_ids"][1, :short])
    assert torch.equal(left["input_ids"][0], right["input_ids"][0])


def test_return_tensors_np_and_images_only(processor):
    out = processor(images=noise_image(), text=PROMPT, return_tensors="np")
    assert isinstance(out["input_ids"], np.ndarray) and isinstance(out["pixel_values"], np.ndarray)
    images_only = processor(images=[noise_image(), noise_image(5, 6)])
    assert images_only["pixel_values"].shape == (2, 3, TINY_SIZE, TINY_SIZE) and "input_ids" not in images_only


def test_batch_decode_drops_special_tokens(processor, tokenizer):
    text = "<s><|user|>segment<image><|assistant|>It is <SEG> at <loc>.</s><pad><pad>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.decode(ids) == "segmentIt is  at ."
    assert processor.batch_decode([ids, ids]) == ["segmentIt is  at ."] * 2
    assert processor.decode(ids, skip_special_tokens=False) == text


# ============================================================================================
# Images
# ============================================================================================


@pytest.mark.parametrize(
    "height, width, content",
    [
        (1, 1, (64, 64)),
        (4000, 10, (64, 1)),
        (10, 4000, (1, 64)),
        (37, 53, (45, 64)),
        (64, 64, (64, 64)),
        (200, 100, (64, 32)),
    ],
)
def test_frame_geometry(processor, height, width, content):
    image = Image.fromarray(np.full((height, width, 3), 255, dtype=np.uint8))
    out = processor.image_processor([image])
    frame = out["pixel_values"][0]
    assert frame.shape == (3, TINY_SIZE, TINY_SIZE)
    assert out["original_sizes"].tolist() == [[height, width]]
    content_h, content_w = content
    assert torch.allclose(frame[:, :content_h, :content_w], torch.ones(())), "white -> (1 - 0.5) / 0.5 = 1"
    assert (frame[:, content_h:, :] == 0).all() and (frame[:, :, content_w:] == 0).all(), "zero padding bottom/right"


@pytest.mark.parametrize(
    "source, mean", [("sam", [0.485, 0.456, 0.406]), ("detector", [0.48145466, 0.4578275, 0.40821073])]
)
def test_from_preset_dense_sources_get_a_dense_view(source, mean):
    processor = VSMProcessor.from_preset("tiny", dense_feature_source=source)
    assert processor.image_processor.dense_image_size == TINY_SIZE
    assert processor.image_processor.dense_image_mean == mean
    assert processor(images=noise_image(), text=PROMPT)["dense_pixel_values"].shape == (1, 3, TINY_SIZE, TINY_SIZE)


def test_dense_view(processor):
    image_processor = VSMImageProcessor(image_size=TINY_SIZE, dense_image_size=32)
    out = image_processor([noise_image(), solid(20, 10)])
    assert out["pixel_values"].shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert out["dense_pixel_values"].shape == (2, 3, 32, 32)
    white = out["dense_pixel_values"][1]
    expected = (1 - torch.tensor(image_processor.dense_image_mean)) / torch.tensor(image_processor.dense_image_std)
    assert torch.allclose(white[:, 0, 0], expected) and (white[:, :, 16:] == 0).all()
    assert "dense_pixel_values" not in processor.image_processor(noise_image())


WHITE, BLACK = 1.0, -1.0  # normalised with mean = std = 0.5


def _transparent_palette():
    image = Image.new("P", (7, 5), 0)
    image.putpalette([255, 255, 255] * 256)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "make_image, expected",
    [
        (lambda: solid(5, 7), WHITE),
        (lambda: Image.new("RGBA", (7, 5), (255, 255, 255, 255)), WHITE),
        (lambda: Image.new("RGBA", (7, 5), (255, 255, 255, 0)), BLACK),  # composited onto black
        (lambda: solid(5, 7, 255, "L"), WHITE),
        (lambda: Image.new("LA", (7, 5), (255, 0)), BLACK),
        (lambda: solid(5, 7).convert("P"), WHITE),
        (_transparent_palette, BLACK),
        (lambda: Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16)), WHITE),  # I;16
        (lambda: Image.fromarray(np.full((5, 7), 32896, dtype=np.uint16)), 0.0039),  # 128/255 on 16 bits
        (lambda: Image.fromarray(np.full((5, 7), 65535, dtype=np.int32)), WHITE),  # I
        (lambda: Image.fromarray(np.full((5, 7), 1.0, dtype=np.float32)), WHITE),  # F
        (lambda: Image.new("CMYK", (7, 5), (0, 0, 0, 0)), WHITE),
        (lambda: Image.new("1", (7, 5), 1), WHITE),
        (lambda: Image.new("1", (7, 5), 0), BLACK),
    ],
)
def test_pil_modes(processor, make_image, expected):
    image = make_image()
    value, frame = first_pixel(processor, image)
    assert torch.allclose(value, torch.full((3,), expected), atol=2e-3), (image.mode, value)
    assert frame.shape == (3, TINY_SIZE, TINY_SIZE)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((5, 7), 255, np.uint8), WHITE),
        (np.full((5, 7, 1), 255, np.uint8), WHITE),
        (np.full((5, 7, 3), 255, np.uint8), WHITE),
        (np.full((5, 7, 4), 255, np.uint8), WHITE),
        (np.concatenate([np.full((5, 7, 3), 255, np.uint8), np.zeros((5, 7, 1), np.uint8)], -1), BLACK),
        (np.full((5, 7, 3), 65535, np.uint16), WHITE),
        (np.ones((5, 7), bool), WHITE),
        (np.zeros((5, 7, 3), bool), BLACK),
        (np.ones((5, 7, 3), np.float32), WHITE),
        (np.zeros((5, 7, 4), np.float64), BLACK),
        (np.full((5, 7, 3), 0.5, np.float16), 0.0039),
        (torch.full((3, 5, 7), 255, dtype=torch.uint8), WHITE),  # CxHxW
        (torch.ones(5, 7, 3), WHITE),  # HxWxC float
        (torch.ones(1, 5, 7, dtype=torch.bfloat16), WHITE),
        (torch.full((5, 7), 255, dtype=torch.int64), WHITE),
    ],
)
def test_arrays_and_tensors(processor, array, expected):
    out = processor.image_processor(array)
    assert out["original_sizes"].tolist() == [[5, 7]]
    assert torch.allclose(out["pixel_values"][0, :, 0, 0], torch.full((3,), expected), atol=2e-3)


def test_batched_4d_tensor(processor):
    out = processor.image_processor(torch.zeros(2, 3, 5, 7, dtype=torch.uint8))
    assert out["pixel_values"].shape == (2, 3, TINY_SIZE, TINY_SIZE)
    assert out["original_sizes"].tolist() == [[5, 7], [5, 7]]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((5, 7, 2), np.uint8), "shape"),
        (np.full((5, 7, 3), 255.0, np.float32), r"\[0, 1\]"),
        (np.full((5, 7), np.nan, np.float32), "NaN"),
        (np.zeros((2, 2, 2, 2, 2), np.uint8), "shape"),
        (12, "Unsupported"),
        ([], "empty"),
    ],
)
def test_bad_arrays(processor, bad, message):
    with pytest.raises(ValueError, match=message):
        processor.image_processor(bad)


def test_file_paths(processor, tmp_path):
    image = noise_image()
    path = tmp_path / "shape.png"
    image.save(path)
    expected = processor.image_processor(image)["pixel_values"]
    assert torch.equal(processor.image_processor(str(path))["pixel_values"], expected)
    assert torch.equal(processor.image_processor(path)["pixel_values"], expected)
    sixteen_bit = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)).save(sixteen_bit)
    assert torch.allclose(processor.image_processor(sixteen_bit)["pixel_values"][0, :, :4, :6], torch.ones(()))


def test_bad_files_name_the_path(processor, tmp_path):
    png = tmp_path / "good.png"
    noise_image(64, 64).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello, I am not an image")
    cases = [
        (truncated, "corrupt or truncated"),
        (garbage, "PIL can read|corrupt"),
        (empty, "empty"),
        (text_file, "not an image"),
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path, "directory"),
    ]
    for path, reason in cases:
        with pytest.raises(ValueError, match=reason) as info:
            processor.image_processor(str(path))
        assert str(path) in str(info.value)
        error = info.value
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), "no PIL trace"
    with pytest.raises(ValueError, match="does not exist"):
        processor(images=str(tmp_path / "missing.png"), text=PROMPT)


# ============================================================================================
# post_process_generation
# ============================================================================================


def _logits(grid, rows, cols, inside=10.0, outside=-10.0):
    logits = torch.full((grid, grid), outside)
    logits[rows[0] : rows[1], cols[0] : cols[1]] = inside
    return logits


def assert_rectangle(mask, rows, cols):
    """`mask` is the rectangle rows x cols (half-open), up to its corner pixels: bilinear upsampling of
    a +-10 logit step puts the zero crossing between pixel centres along edges, but cuts corners."""
    expected = torch.zeros_like(mask)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    corners = {(r, c) for r in (rows[0], rows[1] - 1) for c in (cols[0], cols[1] - 1)}
    mismatches = {tuple(index) for index in (mask != expected).nonzero().tolist()}
    assert mismatches <= corners, sorted(mismatches)
    assert mask.any(1).nonzero().flatten().tolist() == list(range(*rows))
    assert mask.any(0).nonzero().flatten().tolist() == list(range(*cols))


def test_post_process_masks_and_boxes_map_to_original(processor, tokenizer):
    # Originals 30x64 (landscape) and 64x20 (portrait): L = 64, so 16x16 frame cells are 4 px.
    answer = tokenizer("It is <SEG>. It is at <loc>.</s><pad>", add_special_tokens=False)["input_ids"]
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    sequences = torch.tensor([prompt + answer, prompt + answer])
    outputs = SimpleNamespace(
        sequences=sequences,
        prompt_length=len(prompt),
        pred_masks=[
            torch.stack([_logits(16, (4, 12), (2, 6)), _logits(16, (0, 2), (0, 16))]),  # (2, 16, 16)
            _logits(16, (2, 6), (4, 12))[None].to(torch.bfloat16),
        ],
        pred_boxes=[
            torch.tensor([[0.25, 0.125, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]]),
            torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
        ],
        box_scores=[torch.tensor([0.9, 0.2]), torch.tensor([0.7])],
    )
    results = processor.post_process_generation(outputs, target_sizes=[(30, 64), (64, 20)])
    assert len(results) == 2
    first, second = results
    assert first["text"] == "It is <SEG>. It is at <loc>."
    assert first["masks"].dtype == torch.bool and first["masks"].shape == (2, 30, 64)
    assert_rectangle(first["masks"][0], (16, 30), (8, 24))  # frame rows 16..48 cropped at the image's 30
    assert_rectangle(first["masks"][1], (0, 8), (0, 64))
    assert first["masks"][1].sum() == 8 * 64  # no cut corners at the image border
    assert second["masks"].shape == (1, 64, 20)
    assert_rectangle(second["masks"][0], (8, 24), (16, 20))  # frame cols 16..48 cropped at the image's 20
    assert torch.allclose(first["boxes"], torch.tensor([[8.0, 0.0, 24.0, 16.0], [16.0, 16.0, 48.0, 30.0]]))
    assert torch.allclose(second["boxes"], torch.tensor([[0.0, 0.0, 20.0, 64.0]]))
    assert first["boxes"].dtype == torch.float32 and torch.allclose(first["scores"], torch.tensor([0.9, 0.2]))


def test_post_process_matches_image_processor_frame(processor):
    # An image whose right half is white: its frame's white region, as a logit mask, maps back exactly.
    original = np.zeros((30, 64, 3), np.uint8)
    original[:, 32:] = 255
    frame = processor.image_processor(Image.fromarray(original))["pixel_values"][0, 0]  # (64, 64)
    logits = torch.where(frame > 0, 10.0, -10.0)
    outputs = {"sequences": torch.tensor([[1, 2]]), "pred_masks": [logits[None]]}
    (result,) = processor.post_process_generation(outputs, target_sizes=torch.tensor([[30, 64]]))
    assert torch.equal(result["masks"][0], torch.from_numpy(original[..., 0] > 0))
    assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,) and result["text"] == ""


def test_post_process_empty_and_errors(processor):
    outputs = SimpleNamespace(
        sequences=torch.tensor([[1, 2], [1, 2]]),
        pred_masks=[torch.zeros(0, 16, 16), torch.zeros(0, 16, 16)],
        pred_boxes=[torch.zeros(0, 4), torch.zeros(0, 4)],
        box_scores=[torch.zeros(0), torch.zeros(0)],
    )
    results = processor.post_process_generation(outputs, target_sizes=[(5, 9), (9, 5)])
    assert results[0]["masks"].shape == (0, 5, 9) and results[1]["masks"].shape == (0, 9, 5)
    assert results[0]["boxes"].shape == (0, 4) and results[0]["scores"].shape == (0,)
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_generation(outputs)
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_generation(outputs, target_sizes=[(5, 9)])
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_generation(outputs, target_sizes=(5, 9))


# ============================================================================================
# Save / load, in process and in a clean process
# ============================================================================================


def _sample_inputs(processor, tmp_path):
    image_path = tmp_path / "input.png"
    noise_image(37, 53, seed=3).save(image_path)
    texts = [PROMPT, TEXT_ONLY_PROMPT]
    return image_path, texts, processor(images=[str(image_path), None], text=texts)


def test_save_and_auto_load_in_process(processor, tmp_path):
    from transformers import AutoProcessor

    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert {"processing_vsm.py", "configuration_vsm.py"} <= files
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_vsm.VSMProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == "processing_vsm.VSMImageProcessor"
    assert config["num_image_tokens"] == processor.num_image_tokens

    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_path, texts, expected = _sample_inputs(processor, tmp_path)
    got = loaded(images=[str(image_path), None], text=texts)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert loaded.chat_template == processor.chat_template
    assert loaded.num_image_tokens == processor.num_image_tokens
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    # Saving the loaded processor again keeps it loadable.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "processor_config.json").read_text())["auto_map"] == config["auto_map"]


CLEAN_PROCESS_SCRIPT = """
    import json, os
    import numpy as np
    from transformers import AutoProcessor

    folder, image_path, out_dir = sys.argv[2:5]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    texts = json.loads(open(os.path.join(out_dir, "texts.json")).read())
    out = processor(images=[image_path, None], text=texts)
    for key, value in out.items():
        np.save(os.path.join(out_dir, key + ".npy"), value.numpy())
    with open(os.path.join(out_dir, "module.txt"), "w") as handle:
        handle.write(type(processor).__module__)
"""


def test_clean_process_loads_saved_folder(processor, tmp_path):
    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    image_path, texts, expected = _sample_inputs(processor, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "texts.json").write_text(json.dumps(texts))
    run_in_clean_process(CLEAN_PROCESS_SCRIPT, [folder, image_path, out_dir], tmp_path, timeout=240)
    assert (out_dir / "module.txt").read_text().startswith("transformers_modules")
    for key in ("input_ids", "attention_mask", "pixel_values", "original_sizes"):
        got = np.load(out_dir / f"{key}.npy")
        np.testing.assert_array_equal(got, expected[key].numpy(), err_msg=key)

"""Inference at scale: batched generation, several masks per answer, half precision, device maps, attention
implementations and bitsandbytes quantisation, on the tiny preset."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SEG, LOC = "seg", "loc"
NEW_TOKENS = 5
PATTERN = (SEG, None, LOC, SEG, None)  # the answer each sample is forced to give: None = the model's own token


def forcing(model, pattern, prompt_length):
    """Generation kwargs that make greedy decoding emit `<SEG>` / `<loc>` at the steps `pattern` names (a random
    tiny model never would); the other steps and every hidden state stay the model's own."""
    from transformers import LogitsProcessor, LogitsProcessorList

    ids = {SEG: model.config.seg_token_index, LOC: model.config.loc_token_index}

    class ForcePattern(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt_length
            wanted = pattern[step] if step < len(pattern) else None
            if wanted is None:
                scores[:, list(ids.values())] = -float("inf")  # free steps: ordinary text
                return scores
            forced = torch.full_like(scores, -float("inf"))
            forced[:, ids[wanted]] = 0.0
            return forced

    return {"logits_processor": LogitsProcessorList([ForcePattern()])}


def generate(model, processor, rows, pattern=PATTERN, **overrides):
    from modeling_vsm.evaluation import prompt_text

    inputs = processor(images=[r["image"] for r in rows], text=[prompt_text(processor, r["messages"]) for r in rows],
                       padding=True, padding_side="left", return_tensors="pt")
    inputs.pop("original_sizes")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                          **forcing(model, pattern, inputs["input_ids"].shape[1]), **overrides)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vsm")
    make_tiny_model(seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rows(synthetic_rows):
    """Three prompts of different lengths (left padding differs per row)."""
    picked = [synthetic_rows["sentence"][0], synthetic_rows["colour"][0], synthetic_rows["loc"][0]]
    lengths = {len(r["messages"][0]["content"]) for r in picked}
    assert len(lengths) == 3
    return picked


def test_batched_generate_equals_single_with_several_masks_and_boxes(tiny_processor, rows):
    model = make_tiny_model(seed=1).eval()
    batch = generate(model, tiny_processor, rows)
    generated = batch.sequences[:, batch.prompt_length:]
    assert (generated == model.config.seg_token_index).sum(1).tolist() == [2, 2, 2]
    for i, row in enumerate(rows):
        single = generate(model, tiny_processor, [row])
        assert torch.equal(single.sequences[0, single.prompt_length:], generated[i])
        assert batch.pred_masks[i].shape[0] == 2 and batch.pred_boxes[i].shape == (1, 4)
        assert torch.allclose(single.pred_masks[0], batch.pred_masks[i], atol=1e-4)
        assert torch.allclose(single.pred_boxes[0], batch.pred_boxes[i], atol=1e-5)
        assert torch.allclose(single.box_scores[0], batch.box_scores[i], atol=1e-5)
    # Two `<SEG>` of one answer read different states, so they give different masks.
    assert not torch.allclose(batch.pred_masks[0][0], batch.pred_masks[0][1])


def test_mask_decoding_in_chunks_equals_one_call(monkeypatch):
    model = make_tiny_model().eval()
    grid = torch.randn(2, 8, 8, model.config.dense_size)  # (B_img, g, g, D)
    prompts = torch.randn(5, 1, 1, model.config.dense_size)  # (K, 1, 1, D): projected `<SEG>` states
    image_index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        masks, ious = model.predict_masks(grid, prompts, image_index)
        for chunk in (1, 2, 5):
            monkeypatch.setattr(model, "mask_decode_chunk_size", lambda *args, chunk=chunk: chunk)
            chunked_masks, chunked_ious = model.predict_masks(grid, prompts, image_index)
            assert torch.allclose(chunked_masks, masks, atol=1e-5) and torch.allclose(chunked_ious, ious, atol=1e-6)
    assert masks.shape == (5, 64, 64) and masks.dtype == torch.float32


def test_mask_decode_chunk_size_follows_the_device():
    from modeling_vsm.modeling_vsm import CPU_MASK_DECODE_BYTES

    model = make_tiny_model()
    real = torch.empty(1, 256, 64, 64)  # SAM ViT-B's image embedding: 4 MiB in fp32
    tiny = torch.empty(1, model.config.dense_size, 16, 16)
    assert model.mask_decode_chunk_size(real, 8) == max(1, CPU_MASK_DECODE_BYTES // (4 * 256 * 64 * 64)) == 1
    assert model.mask_decode_chunk_size(tiny, 8) == 8  # small embeddings: one call
    assert model.mask_decode_chunk_size(real.to("meta"), 8) == 8  # an accelerator: one batched call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_mask_decoding_in_fp32(dtype, saved_tiny, tiny_processor, rows):
    from modeling_vsm import VSMForCausalLM

    model = VSMForCausalLM.from_pretrained(saved_tiny, dtype=dtype).eval()
    fp32_modules = tuple(f"{name}." for name in model._keep_in_fp32_modules_strict)
    assert {"prompt_encoder.", "mask_decoder."} <= set(fp32_modules)
    for name, param in model.named_parameters():
        expected = torch.float32 if name.startswith(fp32_modules) else dtype
        assert param.dtype == expected, name
    outputs = generate(model, tiny_processor, rows[:2])
    reference = generate(VSMForCausalLM.from_pretrained(saved_tiny).eval(), tiny_processor, rows[:2])
    for masks, reference_masks in zip(outputs.pred_masks, reference.pred_masks):
        assert masks.dtype == torch.float32 and masks.shape == reference_masks.shape == (2, 64, 64)
        assert torch.isfinite(masks).all()
        agreement = ((masks > 0) == (reference_masks > 0)).float().mean()
        assert agreement > 0.9, f"{dtype} masks agree with fp32 on {agreement:.2f} of the pixels"


def test_device_map_auto_loads_and_matches(saved_tiny, tiny_processor, rows):
    pytest.importorskip("accelerate")
    from modeling_vsm import VSMForCausalLM

    reference = generate(VSMForCausalLM.from_pretrained(saved_tiny).eval(), tiny_processor, rows[:2])
    model = VSMForCausalLM.from_pretrained(saved_tiny, device_map="auto").eval()
    outputs = generate(model, tiny_processor, rows[:2])
    assert torch.equal(outputs.sequences, reference.sequences)
    for masks, reference_masks in zip(outputs.pred_masks, reference.pred_masks):
        assert torch.allclose(masks.cpu(), reference_masks, atol=1e-5)
    # Every layer stack is listed as unsplittable, so accelerate never cuts a layer in two.
    classes = {type(module).__name__ for module in model.modules()}
    assert {"LlamaDecoderLayer", "SiglipEncoderLayer", "SamTwoWayTransformer"} <= classes
    assert {"LlamaDecoderLayer", "SiglipEncoderLayer", "SamTwoWayTransformer"} <= set(model._no_split_modules)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device_map", ["cuda", {"": "cuda:0"}, 0])
def test_device_map_naming_a_missing_device_says_so(device_map, saved_tiny):
    from modeling_vsm import VSMForCausalLM

    with pytest.raises(ValueError, match=r"asks for device 'cuda(:0)?', which this machine does not have"):
        VSMForCausalLM.from_pretrained(saved_tiny, device_map=device_map)


def test_eager_and_sdpa_attention_agree(saved_tiny, tiny_processor, rows):
    from modeling_vsm import VSMForCausalLM

    results = {}
    for implementation in ("eager", "sdpa"):
        model = VSMForCausalLM.from_pretrained(saved_tiny, attn_implementation=implementation).eval()
        assert model.model.language_model.config._attn_implementation == implementation
        assert model.model.vision_tower.config._attn_implementation == implementation
        results[implementation] = generate(model, tiny_processor, rows, output_scores=True)
    eager, sdpa = results["eager"], results["sdpa"]
    assert torch.equal(eager.sequences, sdpa.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(eager.scores, sdpa.scores))
    for name in ("pred_masks", "pred_boxes", "box_scores"):
        for a, b in zip(getattr(eager, name), getattr(sdpa, name)):
            assert torch.allclose(a, b, atol=1e-4), name


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantises_only_the_language_model(bits, saved_tiny, tiny_processor, rows):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quantization]')")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from modeling_vsm import VSMForCausalLM

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        quantised_type = bnb.nn.Linear4bit
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
        quantised_type = bnb.nn.Linear8bitLt
    model = VSMForCausalLM.from_pretrained(saved_tiny, quantization_config=config).eval()
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    quantised = {name for name, module in linears.items() if isinstance(module, quantised_type)}
    assert quantised and all(name.startswith("model.language_model.layers.") for name in quantised)
    in_lm_layers = {name for name in linears if name.startswith("model.language_model.layers.")}
    assert quantised == in_lm_layers  # vision, projector, SAM, heads, lm_head: full precision
    outputs = generate(model, tiny_processor, rows[:2])
    assert [m.shape[0] for m in outputs.pred_masks] == [2, 2]
    assert all(torch.isfinite(m).all() for m in outputs.pred_masks)
    assert all(torch.isfinite(b).all() and b.shape == (1, 4) for b in outputs.pred_boxes)


def test_explicit_quantization_skip_modules_are_kept(saved_tiny):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from modeling_vsm import VSMForCausalLM

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "mask_decoder", "prompt_encoder"])
    model = VSMForCausalLM.from_pretrained(saved_tiny, quantization_config=config)
    assert isinstance(model.model.vision_tower.encoder.layers[0].mlp.fc1, bnb.nn.Linear8bitLt)  # the user's choice
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)


def test_no_hard_coded_device_in_the_code():
    sources = [*ROOT.glob("*_vsm/*.py")]
    assert len(sources) >= 5
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\.cuda\(|device\s*=\s*['\"]cuda", text), f"{path.name} hard-codes a CUDA device"


@pytest.mark.parametrize("mode", [{"num_beams": 2, "num_return_sequences": 2}, {"do_sample": True, "num_return_sequences": 2}],
                         ids=["beams", "sampling"])
def test_each_returned_sequence_gets_the_masks_and_boxes_of_its_own_tokens(tiny_processor, rows, mode):
    """A batch of 2 x 2 returned sequences: the encoder outputs are expanded with the ids, and each sequence's masks
    and boxes equal a teacher-forced forward of that sequence (for beams, the kept beam's states)."""
    from modeling_vsm.evaluation import prompt_text

    model = make_tiny_model(seed=1).eval()
    batch = rows[:2]
    inputs = tiny_processor(images=[r["image"] for r in batch], text=[prompt_text(tiny_processor, r["messages"]) for r in batch],
                            padding=True, padding_side="left", return_tensors="pt")
    sizes = inputs.pop("original_sizes")
    prompt_length = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    outputs = model.generate(**inputs, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True,
                             **forcing(model, PATTERN, prompt_length), **mode)
    assert outputs.sequences.shape[0] == 4 and len(outputs.pred_masks) == len(outputs.pred_boxes) == 4
    for index, sequence in enumerate(outputs.sequences):
        sample = index // 2
        attention_mask = torch.cat([inputs["attention_mask"][sample], torch.ones(len(sequence) - prompt_length, dtype=torch.long)])
        with torch.no_grad():
            forced = model(input_ids=sequence[None], attention_mask=attention_mask[None],
                           pixel_values=inputs["pixel_values"][sample : sample + 1])
        assert forced.pred_masks[0].shape[0] == 2 and forced.pred_boxes[0].shape[0] == 1
        assert torch.allclose(outputs.pred_masks[index], forced.pred_masks[0], atol=1e-4)
        assert torch.allclose(outputs.pred_boxes[index], forced.pred_boxes[0], atol=1e-4)
    results = tiny_processor.post_process_generation(outputs, target_sizes=sizes)  # B sizes for B x 2 sequences
    assert [tuple(r["masks"].shape[1:]) for r in results] == [tuple(size) for size in sizes.tolist() for _ in range(2)]
    torch.manual_seed(0)
    plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, **forcing(model, PATTERN, prompt_length), **mode)
    assert torch.equal(plain, outputs.sequences)  # without return_dict_in_generate: the same sequences


def test_beam_search_with_one_beam_equals_greedy(tiny_processor, rows):
    model = make_tiny_model(seed=1).eval()
    greedy = generate(model, tiny_processor, rows)
    beam = generate(model, tiny_processor, rows, num_beams=1)
    assert torch.equal(greedy.sequences, beam.sequences)
    for a, b in zip(greedy.pred_masks + greedy.pred_boxes, beam.pred_masks + beam.pred_boxes):
        assert torch.equal(a, b)

"""VSMForCausalLM: forward shapes and losses for every mix of targets, gradients, generation, errors."""

import copy
import math
import warnings

import pytest
import torch

from conftest import make_batch, make_tiny_model, processor_for_source

MASK_SIDE = 64  # the tiny preset's mask logits: 4 x its 16 x 16 prompt grid
# SAM parts VSM never drives: point / box / mask prompts, and the multimask outputs (LISA also decodes
# one mask per prompt). They are kept so that SAM checkpoints load exactly.
UNUSED_SAM_PARTS = (
    "prompt_encoder.mask_embed.",
    "prompt_encoder.point_embed.",
    "prompt_encoder.not_a_point_embed.",
    "mask_decoder.output_hypernetworks_mlps.1.",
    "mask_decoder.output_hypernetworks_mlps.2.",
    "mask_decoder.output_hypernetworks_mlps.3.",
)


def rows_of(synthetic_rows, *kinds):
    return [synthetic_rows[kind][i] for i, kind in enumerate(kinds)]


MIXES = {
    "segmentation": ("colour", "position", "sentence"),
    "boxes": ("loc", "loc"),
    "text only": ("vqa", "vqa"),
    "everything": ("kind", "loc", "vqa", "size"),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_forward_shapes_and_finite_loss(mix, tiny_processor, synthetic_rows):
    rows = rows_of(synthetic_rows, *MIXES[mix])
    batch = make_batch(tiny_processor, rows)
    model = make_tiny_model()
    outputs = model(**batch)
    batch_size, length = batch["input_ids"].shape
    assert outputs.logits.shape == (batch_size, length, model.config.text_config.vocab_size)
    assert torch.isfinite(outputs.loss)
    for row, masks, boxes, scores in zip(rows, outputs.pred_masks, outputs.pred_boxes, outputs.box_scores):
        assert masks.shape == (len(row["masks"]), MASK_SIDE, MASK_SIDE)
        assert boxes.shape == (len(row["boxes"]), 4) and scores.shape == (len(row["boxes"]),)
        assert ((boxes >= 0) & (boxes <= 1)).all() and ((scores >= 0) & (scores <= 1)).all()
    has_masks = any(row["masks"] for row in rows)
    has_boxes = any(row["boxes"] for row in rows)
    assert (outputs.patch_boxes is not None) == has_boxes
    for boxes, scores, patch_boxes, patch_scores in zip(outputs.pred_boxes, outputs.box_scores, outputs.patch_boxes or [],
                                                        outputs.patch_box_scores or []):
        # every patch's box and score; the best patch's are `pred_boxes` / `box_scores`
        assert patch_boxes.shape == (*patch_scores.shape, 4) and len(patch_scores) == len(boxes)
        best = patch_scores.argmax(-1)
        assert torch.allclose(patch_scores.max(-1).values, scores)
        assert torch.equal(patch_boxes[torch.arange(len(boxes)), best], boxes)
    assert (outputs.mask_dice_loss > 0) == has_masks and (outputs.mask_bce_loss > 0) == has_masks
    assert (outputs.det_loss > 0) == has_boxes
    assert outputs.ce_loss > 0
    config = model.config
    expected = (config.ce_loss_weight * outputs.ce_loss + config.bce_loss_weight * outputs.mask_bce_loss
                + config.dice_loss_weight * outputs.mask_dice_loss + config.iou_loss_weight * outputs.mask_iou_loss
                + config.det_loss_weight * outputs.det_loss)
    assert torch.allclose(outputs.loss, expected)


def test_gradient_reaches_every_trainable_part(tiny_processor, synthetic_rows):
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, *MIXES["everything"]))
    model = make_tiny_model(iou_loss_weight=1.0)  # so SAM's IoU head trains too
    model.train()
    # The mask refiner's last convolution starts at zero (the identity), so the layers before it only get a
    # gradient once it has moved: take one step first.
    model(**batch).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(**batch).loss.backward()
    missing = [
        name for name, p in model.named_parameters()
        if not name.startswith(UNUSED_SAM_PARTS) and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_heads_take_part_in_the_graph_without_targets(tiny_processor, synthetic_rows, tmp_path):
    """Under torch.distributed a text-only batch still gives every head a (zero) gradient, so DDP does not
    wait for them; one process skips that."""
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, "vqa", "vqa"))
    model = make_tiny_model()
    model.train()
    model(**batch).loss.backward()
    assert model.mask_decoder.iou_token.weight.grad is None
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model(**batch).loss.backward()
    finally:
        torch.distributed.destroy_process_group()
    assert torch.count_nonzero(model.mask_decoder.iou_token.weight.grad) == 0
    assert torch.count_nonzero(model.box_head.dense0.weight.grad) == 0


def test_mask_losses_of_targets_of_different_sizes_are_the_per_sample_losses():
    """`seg_loss` scores the masks of same-size targets together: a batch whose targets have two sizes (and
    two masks in one sample) gives the sums of each sample scored alone, divided by the mask count."""
    model = make_tiny_model(iou_loss_weight=1.0)
    generator = torch.Generator().manual_seed(0)
    side = model.pred_mask_side()
    pred_masks = [torch.randn(n, side, side, generator=generator) for n in (1, 2, 1)]
    decoder_masks = [torch.randn(n, side // 2, side // 2, generator=generator) for n in (1, 2, 1)]
    iou_predictions = [torch.rand(n, generator=generator) for n in (1, 2, 1)]
    gt_masks = [torch.randint(0, 2, (n, height, width), generator=generator, dtype=torch.uint8)
                for n, (height, width) in zip((1, 2, 1), ((48, 64), (64, 64), (48, 64)))]
    gt_masks[1][0, :4] = 255  # ignored pixels
    together = model.seg_loss(pred_masks, iou_predictions, gt_masks, decoder_masks=decoder_masks)
    alone = [model.seg_loss(pred_masks[i:i + 1], iou_predictions[i:i + 1], gt_masks[i:i + 1], decoder_masks=decoder_masks[i:i + 1])
             for i in range(3)]
    for part, value in enumerate(together):
        expected = sum(losses[part] * gt_masks[i].shape[0] for i, losses in enumerate(alone)) / 4
        torch.testing.assert_close(value, expected)


def test_masked_pixels_and_empty_targets_keep_the_loss_finite(tiny_processor, synthetic_rows):
    rows = rows_of(synthetic_rows, "colour", "kind")
    batch = make_batch(tiny_processor, rows)
    batch["gt_masks"] = [torch.zeros_like(batch["gt_masks"][0]), torch.full_like(batch["gt_masks"][1], 255)]
    outputs = make_tiny_model()(**batch)
    assert all(math.isfinite(getattr(outputs, name).item()) for name in ("loss", "mask_bce_loss", "mask_dice_loss"))


def test_loss_normalisers_make_accumulation_exact(tiny_processor, synthetic_rows):
    """Two halves, each normalised by the whole batch's totals, sum to the whole batch's loss."""
    rows = rows_of(synthetic_rows, "colour", "loc", "vqa", "size")
    model = make_tiny_model()
    full = model(**make_batch(tiny_processor, rows))
    totals = {
        "num_items_in_batch": int((make_batch(tiny_processor, rows)["labels"][:, 1:] != -100).sum()),
        "num_masks_in_batch": sum(len(r["masks"]) for r in rows),
        "num_boxes_in_batch": sum(len(r["boxes"]) for r in rows),
    }
    halves = [model(**make_batch(tiny_processor, part), **totals) for part in (rows[:2], rows[2:])]
    for name in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "det_loss"):
        assert sum(getattr(h, name).item() for h in halves) == pytest.approx(getattr(full, name).item(), rel=1e-4)


def test_seg_hidden_state_is_the_one_that_predicts_seg(tiny_processor, synthetic_rows):
    """LISA's convention: the state at the position BEFORE `<SEG>` prompts the decoder. Changing the `<SEG>`
    token's own embedding must not change the mask; changing the token before it must."""
    rows = rows_of(synthetic_rows, "colour")
    batch = make_batch(tiny_processor, rows)
    model = make_tiny_model().eval()
    reference = model(**batch).pred_masks[0]
    seg_position = int((batch["input_ids"][0] == model.config.seg_token_index).nonzero()[0])
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.seg_token_index] += 1.0
    assert torch.allclose(model(**batch).pred_masks[0], reference, atol=1e-6)
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][0, seg_position - 1] = 300
    assert not torch.allclose(model(**changed).pred_masks[0], reference, atol=1e-4)


def prompt_inputs(processor, rows):
    from modeling_vsm.evaluation import prompt_text

    return processor(images=[r["image"] for r in rows], text=[prompt_text(processor, r["messages"]) for r in rows],
                     padding_side="left", return_tensors="pt")


def forcing(token_id, every: int = 1):
    """Generation kwargs that make greedy decoding emit `token_id` at every `every`-th step (a random
    tiny model never would); the hidden states stay the model's own."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceToken(LogitsProcessor):
        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores):
            if self.step % every == 0:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, token_id] = 0.0
            self.step += 1
            return scores

    return {"logits_processor": LogitsProcessorList([ForceToken()])}


def test_generate_without_seg_returns_empty_lists(tiny_processor, synthetic_rows):
    rows = rows_of(synthetic_rows, "colour", "vqa")
    inputs = prompt_inputs(tiny_processor, rows)
    inputs.pop("original_sizes")
    model = make_tiny_model().eval()
    outputs = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    generated = outputs.sequences[:, outputs.prompt_length:]
    assert not (generated == model.config.seg_token_index).any()
    assert [m.shape[0] for m in outputs.pred_masks] == [0, 0]
    assert [b.shape[0] for b in outputs.pred_boxes] == [0, 0]
    assert outputs.hidden_states is None  # not asked for: not kept
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, outputs.sequences)


@pytest.mark.parametrize(
    "token, overrides",
    [
        ("seg", {}),
        ("loc", {}),
        ("seg", {"bidirectional_image_heads": 0}),
        ("seg", {"image_attention": "bidirectional"}),
        ("seg", {"image_attention": "causal"}),
        ("seg", {"image_attention": "causal", "bidirectional_image_heads": 2}),
        ("seg", {"image_scans": ["row", "column"], "image_attention": "causal"}),
    ],
)
def test_generate_with_seg_or_loc_matches_teacher_forcing(token, overrides, tiny_processor, synthetic_rows):
    from processing_vsm import VSMProcessor

    processor = VSMProcessor.from_preset("tiny", **overrides) if "image_scans" in overrides else tiny_processor
    rows = rows_of(synthetic_rows, "sentence", "kind")  # prompts of different lengths: left padding
    inputs = prompt_inputs(processor, rows)
    sizes = inputs.pop("original_sizes")
    model = make_tiny_model(**overrides).eval()
    token_id = getattr(model.config, f"{token}_token_index")
    new_tokens = 3
    outputs = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             **forcing(token_id))
    assert (outputs.sequences[:, outputs.prompt_length:] == token_id).all()
    # The same sequence teacher-forced (KV cache off) gives the same masks / boxes.
    padding = torch.cat([inputs["attention_mask"], torch.ones_like(outputs.sequences[:, outputs.prompt_length:])], 1)
    forced = model(input_ids=outputs.sequences, pixel_values=inputs["pixel_values"], attention_mask=padding)
    if token == "seg":
        for generated, teacher in zip(outputs.pred_masks, forced.pred_masks):
            assert generated.shape == (new_tokens, MASK_SIDE, MASK_SIDE)
            assert torch.allclose(generated, teacher, atol=1e-4)
    else:
        for generated, teacher in zip(outputs.pred_boxes, forced.pred_boxes):
            assert generated.shape == (new_tokens, 4)
            assert torch.allclose(generated, teacher, atol=1e-5)
    results = processor.post_process_generation(outputs, target_sizes=sizes.tolist())
    for row, result in zip(rows, results):
        width, height = row["image"].size
        assert result["masks"].shape[-2:] == (height, width) if token == "seg" else result["boxes"].shape == (new_tokens, 4)


@pytest.mark.parametrize("source", ["lm", "shared"])
def test_follow_up_segmentation_question_warns_with_lm_features(source, tiny_processor, synthetic_rows, caplog):
    """With "lm" dense features the image positions read only the first question: a prompt that already holds a
    `<SEG>` answer asks a follow-up whose mask would come from them, and the user is told so."""
    from modeling_vsm.evaluation import prompt_text
    from modeling_vsm.training import attach_image

    first, second = rows_of(synthetic_rows, "colour", "kind")
    follow_up = attach_image(first["messages"], tiny_processor) + [second["messages"][0]]
    texts = {
        "single": prompt_text(tiny_processor, second["messages"]),
        "follow-up": tiny_processor.apply_chat_template(follow_up, tokenize=False, add_generation_prompt=True),
    }
    model = make_tiny_model(dense_feature_source=source).eval()
    warned = {}
    for name, text in texts.items():
        inputs = tiny_processor(images=[first["image"]], text=[text], return_tensors="pt")
        inputs.pop("original_sizes")
        caplog.clear()
        with caplog.at_level("WARNING"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        warned[name] = any("follow-up question" in record.getMessage() for record in caplog.records)
    assert warned == {"single": False, "follow-up": source == "lm"}


def test_generate_steps_one_token_on_the_kv_cache(tiny_processor, synthetic_rows):
    """After the prefill each step feeds the LM one token and the cache, under the keyword this transformers
    names it (`cache` from 5.24, `past_key_values` before), with no warning about the other name."""
    from modeling_vsm.modeling_vsm import CACHE_NAME

    inputs = prompt_inputs(tiny_processor, rows_of(synthetic_rows, "colour", "vqa"))
    inputs.pop("original_sizes")
    model = make_tiny_model().eval()
    calls = []
    language_model_forward = model.model.language_model.forward

    def recording_forward(**kwargs):
        calls.append((kwargs["inputs_embeds"].shape[1], kwargs.get(CACHE_NAME) is not None, sorted(kwargs)))
        return language_model_forward(**kwargs)

    model.model.language_model.forward = recording_forward
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Both `past_key_values` and `cache` are set"
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert [(length, has_cache) for length, has_cache, _ in calls] == [(prompt_length, True), (1, True), (1, True)]
    other_name = {"cache": "past_key_values", "past_key_values": "cache"}[CACHE_NAME]
    assert all(other_name not in keywords for _, _, keywords in calls)


def test_batched_generate_equals_single(tiny_processor, synthetic_rows):
    """Left padding with prompts of different lengths: batch results equal per-sample results."""
    rows = rows_of(synthetic_rows, "sentence", "colour")
    model = make_tiny_model().eval()

    def run(subset):
        inputs = prompt_inputs(tiny_processor, subset)
        inputs.pop("original_sizes")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             **forcing(model.config.seg_token_index, every=2))
        return out.sequences[:, out.prompt_length:], out.pred_masks

    batch_tokens, batch_masks = run(rows)
    assert batch_tokens.shape[0] == 2
    for i, row in enumerate(rows):
        tokens, masks = run([row])
        assert torch.equal(tokens[0], batch_tokens[i])
        assert torch.allclose(masks[0], batch_masks[i], atol=1e-4)


def test_image_token_errors(tiny_processor, synthetic_rows):
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, "colour"))
    model = make_tiny_model()
    with pytest.raises(ValueError, match="no image was given"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="tokens: 64, features: 128"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1))


def test_target_count_errors(tiny_processor, synthetic_rows):
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, "colour", "loc"))
    model = make_tiny_model()
    too_many = dict(batch, gt_masks=[batch["gt_masks"][0].repeat(2, 1, 1), batch["gt_masks"][1]])
    with pytest.raises(ValueError, match=r"Sample 0 has 1 `<SEG>` token\(s\) in its input but 2 ground-truth"):
        model(**too_many)
    no_box = dict(batch, gt_boxes=[batch["gt_boxes"][0], torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="Sample 1 has 1 `<loc>` token"):
        model(**no_box)


def test_seg_without_image_raises(tiny_processor):
    model = make_tiny_model()
    ids = torch.tensor([[1, 6, 300, 7, 300, model.config.seg_token_index, 2]])
    with pytest.raises(ValueError, match="no `<image>`"):
        model(input_ids=ids, labels=ids, gt_masks=[torch.zeros(1, MASK_SIDE, MASK_SIDE)])


def test_bidirectional_image_block_mask(tiny_processor, synthetic_rows):
    """Image positions see every position of their image; text stays causal; padding stays masked."""
    model = make_tiny_model(image_attention="bidirectional")
    inputs = prompt_inputs(tiny_processor, rows_of(synthetic_rows, "sentence", "kind"))
    ids, padding = inputs["input_ids"], inputs["attention_mask"]
    allowed = model.model.image_block_attention_mask(ids, padding, torch.float32)[:, 0] == 0  # (B, T, T)
    row = 1  # the shorter prompt: left padded
    image = (ids[row] == model.config.image_token_index).nonzero()[:, 0]
    first, last = int(image[0]), int(image[-1])
    assert allowed[row, first, last] and allowed[row, last, first]
    assert not allowed[row, first - 1, first] and not allowed[row, last + 1, last + 2]  # text before / after: causal
    assert not allowed[row, last, 0] and padding[row, 0] == 0  # padding never attended


def test_column_causal_image_block_mask(tiny_processor, synthetic_rows):
    """The tiny preset: in most heads a patch sees the columns left of it and its own column down to itself, in
    raster order; the first `bidirectional_image_heads` heads see the whole image; text stays causal in all."""
    model = make_tiny_model()
    config = model.config
    assert config.image_attention == "column_causal" and config.image_scans == ["row"]
    ids = prompt_inputs(tiny_processor, rows_of(synthetic_rows, "position"))["input_ids"]
    heads = model.model.image_block_attention_mask(ids, None, torch.float32)[0] == 0  # (H, T, T)
    assert heads.shape[0] == config.text_config.num_attention_heads
    whole, allowed = heads[0], heads[-1]
    image = (ids[0] == config.image_token_index).nonzero()[:, 0].tolist()
    side = math.isqrt(config.num_image_patches)

    def patch(row, column):
        return image[row * side + column]

    assert allowed[patch(0, 1), patch(side - 1, 0)]  # the bottom of the column to its left: later in raster order
    assert not allowed[patch(1, 0), patch(0, 1)]  # a column to its right: earlier in raster order
    assert allowed[patch(2, 3), patch(1, 3)] and not allowed[patch(1, 3), patch(2, 3)]  # its own column: above only
    assert int(heads[:, patch(1, 0), patch(0, 1)].sum()) == config.bidirectional_image_heads >= 1
    assert whole[patch(0, 0), patch(side - 1, side - 1)]  # the whole image, in both directions
    for mask in (whole, allowed):
        assert mask[patch(0, 0), image[0] - 1] and not mask[image[0] - 1, patch(0, 0)]  # text before: causal
        assert mask[image[-1] + 1, patch(side - 1, side - 1)]  # text after sees the whole image
    one_mode = make_tiny_model(bidirectional_image_heads=0).model.image_block_attention_mask(ids, None, torch.float32)
    assert one_mode.shape[1] == 1 and torch.equal(one_mode[0, 0] == 0, allowed)  # one pattern for every head


def test_column_scan_feeds_each_image_twice(synthetic_rows):
    """image_scans=["row", "column"]: the LM reads each image's patches row by row, then again column by column;
    the "lm" dense grid reads both copies of every patch, back in raster order."""
    from processing_vsm import VSMProcessor

    two_scans = {"image_scans": ["row", "column"], "image_attention": "causal"}
    model, processor = make_tiny_model(**two_scans), VSMProcessor.from_preset("tiny", **two_scans)
    batch = make_batch(processor, rows_of(synthetic_rows, "position", "loc"))
    patches = model.config.num_image_patches
    assert (batch["input_ids"] == model.config.image_token_index).sum(1).tolist() == [2 * patches] * 2
    raster, column = model.model.get_image_features(batch["pixel_values"]).pooler_output.split(patches, dim=1)
    side = math.isqrt(patches)
    grid = raster.unflatten(1, (side, side))  # (B, row, column, D)
    assert torch.equal(column[:, 1], grid[:, 1, 0])  # second in column order: row 1 of column 0
    assert torch.equal(column.unflatten(1, (side, side)).transpose(1, 2), grid)

    outputs = model(**batch)
    assert torch.isfinite(outputs.loss)
    assert outputs.pred_masks[0].shape == (1, MASK_SIDE, MASK_SIDE) and outputs.pred_boxes[1].shape == (1, 4)
    outputs.loss.backward()
    width = model.config.text_config.hidden_size
    dense_weight = next(model.lm_to_dense.parameters())
    assert dense_weight.shape[-1] == 2 * width and dense_weight.grad[:, width:].abs().sum() > 0  # the column copy


DENSE_MODULES = {"shared": "vision_to_dense", "lm": "lm_to_dense", "sam": "dense_encoder", "detector": "detector_to_dense"}


@pytest.mark.parametrize("source", ["sam", "detector"])
def test_separate_dense_encoder_trains_and_generates(source, tiny_processor, synthetic_rows):
    """"sam" / "detector": the processor's dense view goes through the dense encoder once per forward and once
    per generate (before the first step); the loss reaches it; masks and boxes come out for every prompt."""
    processor = processor_for_source(tiny_processor, source)
    rows = rows_of(synthetic_rows, "colour", "loc")
    model = make_tiny_model(dense_feature_source=source)
    assert {name for name in DENSE_MODULES.values() if hasattr(model, name)} == (
        {"dense_encoder", "detector_to_dense"} if source == "detector" else {"dense_encoder"})
    calls = []
    model.dense_encoder.register_forward_hook(lambda *args: calls.append(1))
    batch = make_batch(processor, rows)
    assert batch["dense_pixel_values"].shape[-1] == processor.image_processor.dense_image_size
    outputs = model(**batch)
    assert len(calls) == 1 and torch.isfinite(outputs.loss)
    assert [m.shape[0] for m in outputs.pred_masks] == [1, 0] and [b.shape[0] for b in outputs.pred_boxes] == [0, 1]
    outputs.loss.backward()
    encoder_grads = [p.grad for p in model.dense_encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in encoder_grads) and any(g.abs().sum() > 0 for g in encoder_grads)
    with pytest.raises(ValueError, match="needs the dense view"):
        model(**{k: v for k, v in batch.items() if k != "dense_pixel_values"})
    calls.clear()
    assert_one_pass_in_generate(model, processor, rows, calls)


def assert_one_pass_in_generate(model, processor, rows, calls):
    """`generate` with `<SEG>` forced runs the hooked encoder once (`calls` collects its calls) and gives 2 masks each."""
    inputs = prompt_inputs(processor, rows)
    inputs.pop("original_sizes")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                               **forcing(model.config.seg_token_index))
    assert len(calls) == 1 and [m.shape[0] for m in generated.pred_masks] == [2, 2]


def test_single_encoder_sources_refuse_a_dense_view(tiny_processor, synthetic_rows):
    batch = make_batch(processor_for_source(tiny_processor, "sam"), rows_of(synthetic_rows, "colour"))
    with pytest.raises(ValueError, match="has no dense encoder"):
        make_tiny_model(dense_feature_source="shared")(**batch)


@pytest.mark.parametrize("source", ["shared", "lm"])
def test_single_encoder_sources_run_one_encoder_pass(source, tiny_processor, synthetic_rows):
    rows = rows_of(synthetic_rows, "colour", "loc")
    model = make_tiny_model(dense_feature_source=source)
    assert {name for name in DENSE_MODULES.values() if hasattr(model, name)} == {DENSE_MODULES[source]}
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    outputs = model(**make_batch(tiny_processor, rows))
    assert len(calls) == 1 and torch.isfinite(outputs.loss)
    calls.clear()
    assert_one_pass_in_generate(model, tiny_processor, rows, calls)


def test_mask_refiner_starts_as_identity_and_is_optional(tiny_processor, synthetic_rows):
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, *MIXES["segmentation"]))
    batch.pop("labels"), batch.pop("gt_masks"), batch.pop("gt_boxes")
    refined = make_tiny_model().eval()
    plain = make_tiny_model(mask_refiner_channels=0).eval()
    assert refined.mask_refiner is not None and plain.mask_refiner is None
    assert not any(name.startswith("mask_refiner.") for name in plain.state_dict())
    plain.load_state_dict({k: v for k, v in refined.state_dict().items() if not k.startswith("mask_refiner.")})
    with torch.no_grad():
        for a, b in zip(refined(**batch).pred_masks, plain(**batch).pred_masks):
            torch.testing.assert_close(a, b)  # the zero-initialised residual: identity at the start
        refined.mask_refiner.residual.weight.fill_(1.0)
        changed = refined(**batch).pred_masks
    assert not torch.allclose(changed[0], plain(**batch).pred_masks[0])


def test_conv_stem_adds_pixel_features_to_the_image_tokens_and_starts_as_identity(tiny_processor, synthetic_rows):
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, *MIXES["segmentation"]))
    batch.pop("labels"), batch.pop("gt_masks"), batch.pop("gt_boxes")
    with_stem = make_tiny_model(conv_stem_channels=32).eval()
    plain = make_tiny_model(conv_stem_channels=0).eval()
    assert with_stem.model.conv_stem is not None and plain.model.conv_stem is None
    assert not any(".conv_stem." in name for name in plain.state_dict())
    plain.load_state_dict({k: v for k, v in with_stem.state_dict().items() if ".conv_stem." not in k})
    pixels = batch["pixel_values"]  # (B, 3, 64, 64)
    config = with_stem.config
    assert with_stem.model.conv_stem(pixels).shape == (pixels.shape[0], config.num_image_patches, config.text_config.hidden_size)
    with torch.no_grad():
        for a, b in zip(with_stem(**batch).pred_masks, plain(**batch).pred_masks):
            torch.testing.assert_close(a, b)  # the zero-initialised projection: the model without the stem
        torch.nn.init.normal_(with_stem.model.conv_stem.out.weight)
        changed = with_stem(**batch)
    assert not torch.allclose(changed.logits, plain(**batch).logits)  # the LM reads the stem's features
    assert not torch.allclose(changed.pred_masks[0], plain(**batch).pred_masks[0])


@pytest.mark.parametrize("dilations, stride, radius", [(None, 1, 5), ([1, 2, 4, 8, 1], 1, 16), ([1, 1, 2, 4, 1], 2, 18)])
def test_mask_refiner_dilations_widen_its_view(dilations, stride, radius):
    """A pixel changes the refined mask up to `radius` px away: 5 px through five plain 3x3 convolutions, 16 px
    with dilations 1, 2, 4, 8, 1 (a whole 28 px shape), and as far with the middle three on a grid pooled 2x
    (dilations 1, 2, 4 there); the output keeps the mask's size."""
    from configuration_vsm import VSMConfig
    from modeling_vsm.modeling_vsm import VSMMaskRefiner

    torch.manual_seed(0)
    config = VSMConfig.from_preset("tiny", mask_refiner_depth=5, mask_refiner_dilations=dilations, mask_refiner_stride=stride)
    refiner = VSMMaskRefiner(config)
    torch.nn.init.normal_(refiner.residual.weight)  # not the zero (identity) start
    side, centre = 64, 32
    logits, pixels = torch.zeros(1, side, side), torch.zeros(1, 3, side, side)
    poked = pixels.clone()
    poked[0, :, centre, centre] = 1.0
    prompts = torch.zeros(1, config.sam_config.mask_decoder_config.hidden_size)
    with torch.no_grad():
        change = (refiner(logits, poked, prompts) - refiner(logits, pixels, prompts)).abs()[0]  # (side, side)
    assert change.shape == (side, side)
    affected = (change > 0).nonzero()
    assert int((affected - centre).abs().max()) == radius


def test_prompted_mask_refiner_reads_the_prompt():
    """With `mask_refiner_prompted` the `<SEG>` prompt modulates the refiner (FiLM): the identity at the start
    (zero-initialised), then two prompts refine the same mask on the same image differently."""
    model = make_tiny_model(mask_refiner_prompted=True)
    config, refiner = model.config, model.mask_refiner
    logits, pixels = torch.randn(2, 64, 64), torch.rand(2, 3, 64, 64)
    prompts = torch.randn(2, config.sam_config.mask_decoder_config.hidden_size)
    with torch.no_grad():
        torch.nn.init.normal_(refiner.residual.weight)
        at_start = refiner(logits, pixels, prompts)
        torch.testing.assert_close(at_start, refiner(logits, pixels, prompts.flip(0)))  # FiLM starts at zero
        torch.nn.init.normal_(refiner.prompt_film.weight)
        assert not torch.allclose(refiner(logits, pixels, prompts), refiner(logits, pixels, prompts.flip(0)))
    with pytest.raises(ValueError, match="pass the `<SEG>` prompts"):
        refiner(logits, pixels)


def test_mask_refiner_works_at_the_image_resolution_of_a_coarse_grid(tiny_processor, synthetic_rows):
    """A decoder grid coarser than the image (SAM patch 8: 32 px masks for 64 px images) is refined at 64 px,
    and the zero-initialised refiner is then the bilinear upsampling of the decoder's mask."""
    from configuration_vsm.configuration_vsm import PRESETS

    sam_config = copy.deepcopy(PRESETS["tiny"]["sam_config"])
    sam_config["vision_config"]["patch_size"] = sam_config["prompt_encoder_config"]["patch_size"] = 8
    coarse = {"sam_config": sam_config}
    batch = make_batch(tiny_processor, rows_of(synthetic_rows, *MIXES["segmentation"]))
    refined = make_tiny_model(**coarse)
    plain = make_tiny_model(mask_refiner_channels=0, **coarse)
    plain.load_state_dict({k: v for k, v in refined.state_dict().items() if not k.startswith("mask_refiner.")})
    image_side = refined.config.vision_config.image_size
    assert refined.pred_mask_side() == image_side > plain.pred_mask_side()
    with torch.no_grad():
        refined_masks, plain_masks = refined.eval()(**batch).pred_masks, plain.eval()(**batch).pred_masks
    for fine, coarse_mask in zip(refined_masks, plain_masks):
        assert fine.shape[-2:] == (image_side, image_side)
        upsampled = torch.nn.functional.interpolate(coarse_mask[:, None], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(fine, upsampled[:, 0])
    loss = refined.train()(**batch).loss  # decoder (32 px) and refined (64 px) masks both meet the 64 px targets
    assert torch.isfinite(loss)


def test_logits_only_where_labels_are_predicted_give_the_same_loss(tiny_processor, synthetic_rows):
    from modeling_vsm.training import label_predicting_positions

    batch = make_batch(tiny_processor, rows_of(synthetic_rows, *MIXES["everything"]))
    model = make_tiny_model().eval()
    positions = label_predicting_positions(batch["labels"])
    assert 0 < len(positions) < batch["input_ids"].shape[1] // 2  # the image and the prompt are skipped
    with torch.no_grad():
        full, kept = model(**batch), model(**batch, logits_to_keep=positions)
        last = model(**batch, logits_to_keep=1)
    assert kept.logits.shape[1] == len(positions)
    torch.testing.assert_close(kept.logits, full.logits[:, positions])
    torch.testing.assert_close(kept.ce_loss, full.ce_loss)
    torch.testing.assert_close(kept.loss, full.loss)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])


def test_hungarian_match_finds_the_cheapest_assignment():
    """Against every assignment of 1-4 rows to up to 7 columns: the matched cost is the minimum."""
    import itertools

    from modeling_vsm.modeling_vsm import hungarian_match

    generator = torch.Generator().manual_seed(0)
    for rows, columns in [(1, 5), (2, 2), (2, 6), (3, 5), (4, 7)]:
        for _ in range(5):
            cost = torch.rand(rows, columns, generator=generator)
            matched = hungarian_match(cost)
            assert len(set(matched.tolist())) == rows
            best = min(sum(cost[r, c] for r, c in enumerate(choice)) for choice in itertools.permutations(range(columns), rows))
            assert float(cost[torch.arange(rows), matched].sum()) == pytest.approx(float(best), abs=1e-6)


def test_inference_and_single_instance_matching_need_no_scipy():
    """scipy is imported only to match several instances of one `<loc>` (the training side)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['scipy'] = None  # any import of scipy fails\n"
            "import torch\n"
            "from modeling_vsm.modeling_vsm import hungarian_match\n"
            "assert hungarian_match(torch.tensor([[0.3, 0.1, 0.5]])).tolist() == [1]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

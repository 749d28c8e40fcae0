"""Saved folders load with `trust_remote_code=True` in a clean process where this project is NOT importable."""

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conftest import make_batch, make_tiny_model, run_in_clean_process

CLEAN_PROCESS_SCRIPT = """
    folder, inputs_path, outputs_path = sys.argv[2:5]
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, LogitsProcessor

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == type(base).__name__ == "VSMForCausalLM", type(model)
    assert type(config).__name__ == "VSMConfig" and type(processor).__name__ == "VSMProcessor"
    assert model.config.dense_feature_source == config.dense_feature_source
    inputs = load_file(inputs_path)
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        out = model(**batch)
        out_base = base(**batch)

    class ForceSeg(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = torch.full_like(scores, -float("inf"))
            scores[:, config.seg_token_index] = 0.0
            return scores

    prompt = processor(images=[t for t in inputs["prompt_image"]], text=[str(bytes(inputs["prompt_text"].tolist()), "utf-8")],
                       return_tensors="pt")
    gen = model.generate(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                         pixel_values=prompt["pixel_values"], max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True, logits_processor=[ForceSeg()])
    save_file({
        "logits": out.logits, "base_logits": out_base.logits,
        "masks": torch.cat(out.pred_masks), "boxes": torch.cat(out.pred_boxes), "scores": torch.cat(out.box_scores),
        "prompt_input_ids": prompt["input_ids"], "prompt_pixel_values": prompt["pixel_values"],
        "gen_sequences": gen.sequences, "gen_masks": torch.cat(gen.pred_masks),
    }, outputs_path)
"""


def test_clean_process_round_trip(tmp_path, tiny_processor, synthetic_rows):
    from modeling_vsm.evaluation import prompt_text

    folder = tmp_path / "saved"
    model = make_tiny_model(seed=3).eval()
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)

    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)
    assert {"configuration_vsm.py", "modeling_vsm.py", "processing_vsm.py"} <= set(files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}

    rows = [synthetic_rows["colour"][0], synthetic_rows["loc"][0]]
    batch = make_batch(tiny_processor, rows)
    prompt = prompt_text(tiny_processor, rows[0]["messages"])
    save_file({
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"],
        "prompt_image": torch.tensor(np.array(rows[0]["image"]))[None],  # (1, H, W, 3) uint8
        "prompt_text": torch.tensor(list(prompt.encode("utf-8")), dtype=torch.uint8),
    }, tmp_path / "inputs.safetensors")
    run_in_clean_process(CLEAN_PROCESS_SCRIPT, [folder, tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"],
                         tmp_path)
    remote = load_file(tmp_path / "outputs.safetensors")

    with torch.no_grad():
        local = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
    assert torch.equal(remote["logits"], local.logits)
    assert torch.equal(remote["base_logits"], local.logits)
    # Masks and boxes agree to float rounding (the decoder's kernels may sum in another order).
    assert torch.allclose(remote["masks"], torch.cat(local.pred_masks), rtol=1e-5, atol=1e-6)
    assert torch.allclose(remote["boxes"], torch.cat(local.pred_boxes), rtol=1e-6, atol=1e-7)
    assert torch.allclose(remote["scores"], torch.cat(local.box_scores), rtol=1e-6, atol=1e-7)
    # The remote processor makes the same inputs, and generation gives the same tokens and masks.
    local_prompt = tiny_processor(images=[rows[0]["image"]], text=[prompt], return_tensors="pt")
    assert torch.equal(remote["prompt_input_ids"], local_prompt["input_ids"])
    assert torch.equal(remote["prompt_pixel_values"], local_prompt["pixel_values"])
    from test_modeling import forcing

    generated = model.generate(input_ids=local_prompt["input_ids"], attention_mask=local_prompt["attention_mask"],
                               pixel_values=local_prompt["pixel_values"], max_new_tokens=2, do_sample=False,
                               return_dict_in_generate=True, **forcing(model.config.seg_token_index))
    assert torch.equal(remote["gen_sequences"], generated.sequences)
    assert remote["gen_masks"].shape[0] == 2
    assert torch.allclose(remote["gen_masks"], torch.cat(generated.pred_masks), rtol=1e-5, atol=1e-6)


def test_push_to_hub_inside_save_pretrained_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="Save to a folder first"):
        make_tiny_model().save_pretrained(tmp_path, push_to_hub=True)

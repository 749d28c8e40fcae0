"""Saved folders load with `trust_remote_code=True` in a clean process where this project is NOT importable."""

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conftest import make_batch, make_tiny_model, processor_for_source, run_in_clean_process

CLEAN_PROCESS_SCRIPT = """
  import torch
  from safetensors.torch import load_file, save_file
  from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, LogitsProcessor

  arguments = sys.argv[2:]
  for folder, inputs_path, outputs_path in zip(arguments[0::3], arguments[1::3], arguments[2::3]):
      config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
      processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
      model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
      base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
      assert type(model).__name__ == type(base).__name__ == "VSMForCausalLM", type(model)
      assert type(config).__name__ == "VSMConfig" and type(processor).__name__ == "VSMProcessor"
      assert model.config.dense_feature_source == config.dense_feature_source
      inputs = load_file(inputs_path)
      batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "dense_pixel_values") if k in inputs}
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
                           return_dict_in_generate=True, logits_processor=[ForceSeg()],
                           dense_pixel_values=prompt.get("dense_pixel_values"))
      save_file({
          "logits": out.logits, "base_logits": out_base.logits,
          "masks": torch.cat(out.pred_masks), "boxes": torch.cat(out.pred_boxes), "scores": torch.cat(out.box_scores),
          "prompt_input_ids": prompt["input_ids"], "prompt_pixel_values": prompt["pixel_values"],
          "gen_sequences": gen.sequences, "gen_masks": torch.cat(gen.pred_masks),
      }, outputs_path)
"""


SOURCES = ("lm", "shared", "sam", "detector")


def test_clean_process_round_trip(tmp_path, tiny_processor, synthetic_rows):
    """Every dense-feature source: one clean process loads each saved folder and reproduces logits, masks,
    boxes, the processor's inputs (with the dense view for "sam" / "detector") and generation."""
    from modeling_vsm.evaluation import prompt_text
    from test_modeling import forcing

    rows = [synthetic_rows["colour"][0], synthetic_rows["loc"][0]]
    cases, arguments = [], []
    for source in SOURCES:
        folder = tmp_path / source
        model = make_tiny_model(seed=3, dense_feature_source=source).eval()
        processor = processor_for_source(tiny_processor, source)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

        files = sorted(p.name for p in folder.iterdir())
        assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt")) for name in files)
        assert {"configuration_vsm.py", "modeling_vsm.py", "processing_vsm.py"} <= set(files)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}

        batch = make_batch(processor, rows)
        prompt = prompt_text(processor, rows[0]["messages"])
        model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "dense_pixel_values") if k in batch}
        assert ("dense_pixel_values" in model_inputs) == (source in ("sam", "detector"))
        save_file({
            **model_inputs,
            "prompt_image": torch.tensor(np.array(rows[0]["image"]))[None],  # (1, H, W, 3) uint8
            "prompt_text": torch.tensor(list(prompt.encode("utf-8")), dtype=torch.uint8),
        }, tmp_path / f"{source}_inputs.safetensors")
        cases.append((model, processor, model_inputs, prompt))
        arguments += [folder, tmp_path / f"{source}_inputs.safetensors", tmp_path / f"{source}_outputs.safetensors"]
    run_in_clean_process(CLEAN_PROCESS_SCRIPT, arguments, tmp_path)

    for source, (model, processor, model_inputs, prompt) in zip(SOURCES, cases):
        remote = load_file(tmp_path / f"{source}_outputs.safetensors")
        with torch.no_grad():
            local = model(**model_inputs)
        assert torch.equal(remote["logits"], local.logits), source
        assert torch.equal(remote["base_logits"], local.logits), source
        # Masks and boxes agree to float rounding (the decoder's kernels may sum in another order).
        assert torch.allclose(remote["masks"], torch.cat(local.pred_masks), rtol=1e-5, atol=1e-6), source
        assert torch.allclose(remote["boxes"], torch.cat(local.pred_boxes), rtol=1e-6, atol=1e-7), source
        assert torch.allclose(remote["scores"], torch.cat(local.box_scores), rtol=1e-6, atol=1e-7), source
        # The remote processor makes the same inputs, and generation gives the same tokens and masks.
        local_prompt = processor(images=[rows[0]["image"]], text=[prompt], return_tensors="pt")
        assert torch.equal(remote["prompt_input_ids"], local_prompt["input_ids"])
        assert torch.equal(remote["prompt_pixel_values"], local_prompt["pixel_values"])
        generated = model.generate(input_ids=local_prompt["input_ids"], attention_mask=local_prompt["attention_mask"],
                                   pixel_values=local_prompt["pixel_values"],
                                   dense_pixel_values=local_prompt.get("dense_pixel_values"), max_new_tokens=2,
                                   do_sample=False, return_dict_in_generate=True, **forcing(model.config.seg_token_index))
        assert torch.equal(remote["gen_sequences"], generated.sequences), source
        assert remote["gen_masks"].shape[0] == 2
        assert torch.allclose(remote["gen_masks"], torch.cat(generated.pred_masks), rtol=1e-5, atol=1e-6), source


def test_push_to_hub_inside_save_pretrained_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="Save to a folder first"):
        make_tiny_model().save_pretrained(tmp_path, push_to_hub=True)

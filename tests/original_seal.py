"""SEAL's visual search model (V*, github penghao-wu/vstar, folder VisualSearch/) for converter tests.

Two pieces, both written from the research notes on the original code (no VSM project code is used here):

* `write_tiny_seal` writes a tiny random checkpoint folder in the layout of the published `craigwu/seal_vsm_7b`
  (what `VisualSearch/merge_lora_weights_and_save_hf_model.py` saves with transformers 4.31): `config.json`,
  `generation_config.json`, two `pytorch_model-0000N-of-00002.bin` shards with `pytorch_model.bin.index.json`, and the
  slow sentencepiece tokenizer files with the added tokens. The CLIP vision tower is NOT in the checkpoint (the merge
  script drops every `vision_tower` key); `config.json` points at a separate CLIP folder, as the original points at
  `openai/clip-vit-large-patch14`.
* `SealReference` recomputes what the original inference code does with such a folder (`VisualSearch/model/VSM.py`
  `VSMForCausalLM.inference`, `VisualSearch/model/owlvit/owlvit.py`, the modified SAM decoder in
  `VisualSearch/model/segment_anything/modeling/mask_decoder.py`, the LLaVA splice in
  `VisualSearch/model/llava/model/llava_arch.py` and the preprocessing in `visual_search.py`), in float32.

Everything is CPU-only and small: writing a folder takes well under a second, a forward pass a few milliseconds.
torchvision is never imported (Meta's `segment_anything` package needs the stand-in from `original_checkpoints`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from original_checkpoints import (
    SentencePieceChunkTokenizer,
    install_torchvision_stand_in,
    llava_v1_prompt,
    load_lisa_state_dict,
    quiet_transformers,
    sub_state,
    tokenizer_image_token,
    train_tiny_sentencepiece,
)

# ----------------------------------------------------------------------------------------------------------------
# Constants of the original code
# ----------------------------------------------------------------------------------------------------------------

#: `IMAGE_TOKEN_INDEX` (VisualSearch/utils/utils.py): the id `tokenizer_image_token` puts for `<image>`.
IMAGE_TOKEN_INDEX = -200
#: `conv_llava_v1.system` in `VisualSearch/model/llava/conversation.py`.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
#: The prompt `VSM.inference` in `visual_search.py` builds: llava_v1, `<im_start><image><im_end>\n` before the question.
SEAL_PROMPT_TEMPLATE = LLAVA_V1_SYSTEM + " USER: <im_start><image><im_end>\n{question} ASSISTANT:"
#: The training answer (`ANSWER_LIST` of the detection datasets).
SEAL_ANSWER = "Sure, [LOC]."

#: Tiny sizes. The real ones: LLaMA-7B (4096/32 layers/11008), OWL-ViT B/16 at 768 px (hidden 768, 12 layers,
#: 48x48 grid), SAM decoder dim 256 (MLP 2048, 8 heads), out_dim 512 (the OWL-ViT class-head query size),
#: mask_in_chans 16.
#: Two head counts are not in the checkpoint's shapes or config (the original hard-codes them): OWL-ViT's (12 for
#: google/owlvit-base-patch16, i.e. head dim 64) and the TwoWayTransformer's (8). The tiny sizes keep both rules, head
#: dim 64 for OWL-ViT (hidden 128 = 2 heads) and 8 decoder heads, so that a converter can use the same rules for both.
TINY_SEAL_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    owlvit_hidden_size=128, owlvit_intermediate_size=256, owlvit_num_layers=2, owlvit_num_heads=2,
    owlvit_image_size=96, owlvit_patch_size=16,
    out_dim=24,  # = OWL-ViT text hidden size = class_head.dense0 output = text_hidden_fcs_det output
    sam_dim=32, sam_mlp_dim=64, sam_num_heads=8, mask_in_chans=8,
)
#: Extra gain on the last layer of the tiny mask decoder's hypernetwork MLPs (random weights give ~0.1 logits).
MASK_HYPERNETWORK_GAIN = 4.0
#: The TwoWayTransformer head count VSM.py hard-codes.
SEAL_MASK_DECODER_HEADS = 8
#: OWL-ViT B/16's attention head size (hidden 768 / 12 heads); the reference derives the head count from it.
OWLVIT_HEAD_DIM = 64


# ----------------------------------------------------------------------------------------------------------------
# Modules of the original code that are not in transformers / Meta's segment_anything
# ----------------------------------------------------------------------------------------------------------------

def _segment_anything_modeling():
    """Meta's `segment_anything.modeling` (its package `__init__` imports torchvision, hence the stand-in)."""
    install_torchvision_stand_in()
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from segment_anything.modeling.common import LayerNorm2d

    return MaskDecoder, PromptEncoder, TwoWayTransformer, LayerNorm2d


class SealUpsample(nn.Module):
    """`Upsample` of `VisualSearch/model/segment_anything/modeling/mask_decoder.py`: bilinear x2 (align_corners False,
    computed in float32 and cast back) then a 3x3 convolution with padding 1 (parameters under `.conv.`). SEAL uses it
    in place of SAM's `ConvTranspose2d` upscaling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(x.float(), scale_factor=2.0, mode="bilinear", align_corners=False).to(x.dtype)
        return self.conv(upsampled)


def build_seal_prompt_encoder(dim: int, grid: int, image_size: int, mask_in_chans: int):
    """`VSMMetaModel.initialize_lisa_modules` (VisualSearch/model/VSM.py): Meta's `PromptEncoder(embed_dim=256,
    image_embedding_size=(48, 48), input_image_size=(768, 768), mask_in_chans=16)` at the given sizes. (SEAL's copy only
    adds a `text_embeds` argument, re-implemented in `SealReference`.)"""
    _, PromptEncoder, _, _ = _segment_anything_modeling()
    return PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
                         mask_in_chans=mask_in_chans)


def build_seal_mask_decoder(dim: int, mlp_dim: int, num_heads: int):
    """`VSMMetaModel.initialize_lisa_modules`: Meta's `MaskDecoder(num_multimask_outputs=3, TwoWayTransformer(depth=2,
    ...), iou_head_depth=3, iou_head_hidden_dim=dim)` with SEAL's `output_upscaling` = `SealUpsample(dim, dim//4)`,
    `LayerNorm2d(dim//4)`, GELU, `SealUpsample(dim//4, dim//8)`, GELU (keys `output_upscaling.0.conv.*`, `.1.*`,
    `.3.conv.*`)."""
    MaskDecoder, _, TwoWayTransformer, LayerNorm2d = _segment_anything_modeling()
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
    )
    decoder.output_upscaling = nn.Sequential(
        SealUpsample(dim, dim // 4), LayerNorm2d(dim // 4), nn.GELU(), SealUpsample(dim // 4, dim // 8), nn.GELU(),
    )
    return decoder


def _text_hidden_fcs(in_dim: int, out_dim: int) -> nn.ModuleList:
    """`text_hidden_fcs_det` / `text_hidden_fcs_seg` (VSM.py):
    ModuleList([Sequential(Linear, ReLU, Linear, Dropout(0))])."""
    return nn.ModuleList([nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim),
                                        nn.Dropout(0.0))])


def _tiny_owlvit_config(sizes: dict):
    from transformers import OwlViTConfig

    text = dict(hidden_size=sizes["out_dim"], intermediate_size=2 * sizes["out_dim"], num_hidden_layers=1,
                num_attention_heads=2, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    vision = dict(hidden_size=sizes["owlvit_hidden_size"], intermediate_size=sizes["owlvit_intermediate_size"],
                  num_hidden_layers=sizes["owlvit_num_layers"], num_attention_heads=sizes["owlvit_num_heads"],
                  image_size=sizes["owlvit_image_size"], patch_size=sizes["owlvit_patch_size"], hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
    return OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16)


# ----------------------------------------------------------------------------------------------------------------
# Writing the tiny checkpoint
# ----------------------------------------------------------------------------------------------------------------

def _randomise_(named_tensors, generator: torch.Generator) -> None:
    """Give every tensor non-trivial random values: LLaMA token embeddings ~ N(0, 1), other matrices / convolutions /
    embeddings ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.2^2), biases and other vectors N(0, 0.1^2) (N(0, 0.5^2) for the
    OWL-ViT class embedding)."""
    with torch.no_grad():
        for name, tensor in named_tensors:
            if not torch.is_floating_point(tensor):
                continue
            if "embed_tokens" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            elif tensor.dim() >= 2:
                fan_in = int(np.prod(tensor.shape[1:]))
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("class_embedding"):
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def _llama_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """`LlamaRotaryEmbedding.inv_freq` of transformers 4.31 (a persistent buffer then, so it is in the checkpoint)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


def _seal_config(sizes: dict, vocab_size: int, vision_tower: str, mm_hidden_size: int) -> dict:
    """`config.json` as transformers 4.31 saved it for `VSMForCausalLM` (a `LlavaConfig`, model_type "llava"): the
    LLaVA-Lightning-7B-v1-1 base fields, the LLaVA fields and those `VSMModel.__init__` / the merge script set."""
    return {
        "_name_or_path": "./LLaVA/LLaVA-Lightning-7B-v1-1",
        "architectures": ["VSMForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": True,
        "hidden_act": "silu",
        "hidden_size": sizes["hidden_size"],
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": sizes["intermediate_size"],
        "max_position_embeddings": 2048,
        "max_sequence_length": 2048,
        "mm_hidden_size": mm_hidden_size,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "model_type": "llava",
        "num_attention_heads": sizes["num_attention_heads"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_key_value_heads": sizes["num_attention_heads"],
        "out_dim": sizes["out_dim"],
        "pad_token_id": 0,
        "pretrain_mm_mlp_adapter": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "train_mask_decoder": True,
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower": vision_tower,
        "vocab_size": vocab_size,
    }


#: `generation_config.json` as 4.31 wrote it: built from the base config at load time, before `VSMModel` set use_cache
#: False, hence no "use_cache" entry (LISA-7B-v1's file, from the same pipeline, is 132 bytes = this).
_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                      "transformers_version": "4.31.0"}


def _dump_json(path: str, obj: dict, sort_keys: bool = True) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def _added_token_431(content: str, with_type: bool) -> dict:
    token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if with_type else token


def _write_tokenizer_files(folder: str, sp_vocab_size: int, im_tokens_in_base: bool) -> dict:
    """The slow-tokenizer files `tokenizer.save_pretrained` of transformers 4.31 writes in the merge script
    (`AutoTokenizer.from_pretrained(base, model_max_length=512, padding_side="right", use_fast=False)`,
    `pad_token = unk_token`, `add_tokens("[LOC]")`, `add_tokens(["<im_start>", "<im_end>"], special_tokens=True)`):
    `tokenizer.model` (the tiny sentencepiece model of `original_checkpoints`), `added_tokens.json`,
    `special_tokens_map.json` (435 B form), `tokenizer_config.json` (744 B form). Checked byte for byte against
    transformers 4.31.0 output on the same base files. Returns the added-token ids."""
    with open(os.path.join(folder, "tokenizer.model"), "wb") as handle:
        handle.write(train_tiny_sentencepiece(sp_vocab_size))
    V = sp_vocab_size
    if im_tokens_in_base:  # LLaVA-Lightning-7B-v1-1 already has <im_patch>, <im_start>, <im_end>: add_tokens keeps them
        added = {"<im_patch>": V, "<im_start>": V + 1, "<im_end>": V + 2, "[LOC]": V + 3}
    else:
        added = {"[LOC]": V, "<im_start>": V + 1, "<im_end>": V + 2}
    _dump_json(os.path.join(folder, "added_tokens.json"), added)
    _dump_json(os.path.join(folder, "special_tokens_map.json"), {
        "bos_token": _added_token_431("<s>", False), "eos_token": _added_token_431("</s>", False),
        "pad_token": "<unk>", "unk_token": _added_token_431("<unk>", False)})
    _dump_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _added_token_431("<s>", True),
        "clean_up_tokenization_spaces": False, "eos_token": _added_token_431("</s>", True), "legacy": True,
        "model_max_length": 512, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token_431("<unk>", True)})
    return added


def _steer_answer(llama, chain: Sequence[int], code: float = 10.0, weight: float = 3.0) -> None:
    """Make greedy decoding follow `chain` (the last prompt token, then the answer ids, e.g. "Sure, [LOC].</s>") with
    a wide margin, leaving everything else random: hidden dimension k is reserved for the step chain[k] -> chain[k+1];
    only the embedding of chain[k] carries it (value `code`, so the post-norm state at that token has a large k-th
    entry) and only the `lm_head` row of chain[k+1] reads it (`weight`). The source tokens must be distinct."""
    sources = list(chain[:-1])
    if len(set(sources)) != len(sources) or len(sources) > llama.config.hidden_size:
        raise ValueError(f"cannot steer towards {list(chain)}: repeated source tokens or too long")
    with torch.no_grad():
        embed, head = llama.model.embed_tokens.weight, llama.lm_head.weight
        k = len(sources)
        embed[:, :k] = 0.0
        head[:, :k] = 0.0
        for step, (source, target) in enumerate(zip(chain[:-1], chain[1:])):
            embed[source, step] = code
            head[target, step] = weight


def write_tiny_seal(folder, vision_tower, seed: int = 0, im_tokens_in_base: bool = True,
                    lm_dtype: torch.dtype = torch.bfloat16, include_inv_freq: bool = True,
                    steer_generation: bool = True, sp_vocab_size: int = 400, sizes: Optional[dict] = None) -> dict:
    """Write a tiny RANDOM checkpoint folder in the layout of `craigwu/seal_vsm_7b`.

    What `VisualSearch/merge_lora_weights_and_save_hf_model.py` saves (transformers 4.31 `save_pretrained`):

    - `config.json`: the LlavaConfig fields (model_type "llava", architectures ["VSMForCausalLM"], mm_* fields,
      `out_dim`, `train_mask_decoder`, `use_cache` false, ...) with tiny sizes; `vision_tower` / `mm_vision_tower` =
      the given CLIP folder (the original: "openai/clip-vit-large-patch14"). `generation_config.json` (4.31 form).
    - `pytorch_model-0000{1,2}-of-00002.bin` (`torch.save` of plain dicts; shard 1 ends inside the LLaMA layers, as a
      10 GB first shard does for 7B) and `pytorch_model.bin.index.json` (total_size + weight_map, sorted keys). Keys in
      `VSMForCausalLM.state_dict()` order without the CLIP tower: `model.embed_tokens.weight`, `model.layers.N.*` (with
      the persistent 4.31 `self_attn.rotary_emb.inv_freq` when `include_inv_freq`), `model.norm.weight`,
      `model.mm_projector.{weight,bias}` (one Linear mm_hidden -> hidden), `model.owlvit.{vision_model,class_head,
      box_head,layer_norm}.*` (of a tiny `transformers.OwlViTForObjectDetection`; no `position_ids`, no text model),
      `model.visual_projection.weight` (no bias), `model.prompt_encoder.*` (Meta's PromptEncoder),
      `model.mask_decoder.*` (Meta's MaskDecoder with SEAL's Upsample+Conv3x3 `output_upscaling`),
      `model.text_hidden_fcs_det.0.{0,2}.*` (H->H, ReLU, H->out_dim), `model.text_hidden_fcs_seg.0.{0,2}.*`
      (H->H, ReLU, H->D), `lm_head.weight`. Dtypes as the merge script leaves them: the LLaMA part, the projector and
      the rotary buffers in `lm_dtype` (the base is loaded in bf16); the modules `initialize_lisa_modules` creates
      after loading (OWL-ViT, visual_projection, prompt encoder, mask decoder, text FCs) in float32.
    - tokenizer files (see `_write_tokenizer_files`). `im_tokens_in_base=True` (default): `<im_patch>`=V,
      `<im_start>`=V+1, `<im_end>`=V+2, `[LOC]`=V+3, vocab V+4, because the base LLaVA-Lightning-7B-v1-1 tokenizer
      already holds the three image tokens (as in xinlai/LISA-7B-v1, built the same way on the same base).
      `im_tokens_in_base=False`: `[LOC]`=V, `<im_start>`=V+1, `<im_end>`=V+2, vocab V+3 (seal.md §4's inferred layout).

    Sizes (`TINY_SEAL_SIZES`, override with `sizes`): LM hidden 64 / 2 layers / 4 heads / intermediate 128; OWL-ViT
    vision hidden 128, 2 layers, 2 heads (head dim 64 as in B/16), MLP 256, 96 px, patch 16 (6x6 grid); out_dim 24;
    SAM dim D 32 (MLP 64, 8 heads as hard-coded in VSM.py), mask_in_chans 8. All weights are random with O(1)
    activations (`_randomise_`; the mask hypernetworks get `MASK_HYPERNETWORK_GAIN`). With `steer_generation`, greedy
    decoding of any SEAL prompt (ending "ASSISTANT:") answers exactly "Sure, [LOC].</s>" with logit margins of a few
    units (`_steer_answer`), so `generate` exercises the [LOC] path and stays stable across implementations.
    Returns a dict with the folder, token ids (`answer_ids`: the steered answer), sizes and shard contents.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, OwlViTForObjectDetection

    sizes = dict(TINY_SEAL_SIZES, **(sizes or {}))
    folder = str(folder)
    vision_tower = str(vision_tower)
    os.makedirs(folder, exist_ok=True)
    clip_vision = CLIPVisionConfig.from_pretrained(vision_tower)  # a CLIPModel or CLIPVisionModel folder
    mm_hidden_size = clip_vision.hidden_size

    added = _write_tokenizer_files(folder, sp_vocab_size, im_tokens_in_base)
    vocab_size = sp_vocab_size + len(added)
    config = _seal_config(sizes, vocab_size, vision_tower, mm_hidden_size)
    if lm_dtype != torch.bfloat16:
        config["torch_dtype"] = str(lm_dtype).replace("torch.", "")
    _dump_json(os.path.join(folder, "config.json"), config)
    _dump_json(os.path.join(folder, "generation_config.json"), _GENERATION_CONFIG)

    H, D = sizes["hidden_size"], sizes["sam_dim"]
    grid = sizes["owlvit_image_size"] // sizes["owlvit_patch_size"]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module constructors draw from the global RNG (e.g. SAM's PE Gaussian matrix)
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=H, intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"], num_attention_heads=sizes["num_attention_heads"],
            num_key_value_heads=sizes["num_attention_heads"], rms_norm_eps=config["rms_norm_eps"],
            max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0))
        projector = nn.Linear(mm_hidden_size, H)
        owlvit = OwlViTForObjectDetection(_tiny_owlvit_config(sizes))
        visual_projection = nn.Linear(sizes["owlvit_hidden_size"], D, bias=False)
        prompt_encoder = build_seal_prompt_encoder(D, grid, sizes["owlvit_image_size"], sizes["mask_in_chans"])
        mask_decoder = build_seal_mask_decoder(D, sizes["sam_mlp_dim"], sizes["sam_num_heads"])
        fcs_det = _text_hidden_fcs(H, sizes["out_dim"])
        fcs_seg = _text_hidden_fcs(H, D)
    owl_parts = {name: getattr(owlvit, name) if name != "vision_model" else owlvit.owlvit.vision_model
                 for name in ("vision_model", "class_head", "box_head", "layer_norm")}
    modules = [("llama", llama), ("projector", projector), *owl_parts.items(), ("visual_projection", visual_projection),
               ("mask_decoder", mask_decoder), ("fcs_det", fcs_det), ("fcs_seg", fcs_seg)]
    for prefix, module in modules:
        _randomise_([(f"{prefix}.{n}", p) for n, p in module.named_parameters()], generator)
    # The prompt encoder: only the parts SEAL uses at inference (no_mask_embed, the PE matrix) matter, but all
    # parameters get random values; the Gaussian PE matrix keeps Meta's own N(0, 1) draw.
    _randomise_(list(prompt_encoder.named_parameters()), generator)
    # The answer ids of SEAL_ANSWER after a SEAL prompt ("... ASSISTANT: Sure, [LOC].</s>"), 4.31 tokenization.
    tokenize = SentencePieceChunkTokenizer(folder)
    question = "Please locate the object in this image."
    prompt = tokenizer_image_token(llava_v1_prompt(question, True), tokenize)
    full = tokenizer_image_token(llava_v1_prompt(question, True, SEAL_ANSWER), tokenize)
    assert full[:len(prompt)] == prompt and full[-1] == 2, (prompt, full)
    answer_ids = full[len(prompt):]
    if steer_generation:  # greedy decoding of any SEAL prompt then answers exactly SEAL_ANSWER + "</s>"
        _steer_answer(llama, [prompt[-1], *answer_ids])
    with torch.no_grad():  # O(1) mask logits: the 3-layer hypernetwork MLPs otherwise shrink them to ~0.1
        for mlp in mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(MASK_HYPERNETWORK_GAIN)

    # State dict in VSMForCausalLM order (LlamaModel, [vision_tower dropped], mm_projector, the VSM modules, lm_head).
    lm_state = llama.state_dict()
    state: dict = {"model.embed_tokens.weight": lm_state["model.embed_tokens.weight"]}
    head_dim = H // sizes["num_attention_heads"]
    layer_order = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "self_attn.rotary_emb.inv_freq", "mlp.gate_proj.weight",
                   "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                   "post_attention_layernorm.weight")
    for i in range(sizes["num_hidden_layers"]):
        for name in layer_order:
            key = f"model.layers.{i}.{name}"
            if name.endswith("inv_freq"):
                if include_inv_freq:
                    state[key] = _llama_inv_freq(head_dim)
            else:
                state[key] = lm_state[key]
    state["model.norm.weight"] = lm_state["model.norm.weight"]
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    lm_keys = set(state)
    for name, part in owl_parts.items():
        state.update({f"model.owlvit.{name}.{k}": v for k, v in part.state_dict().items()
                      if not k.endswith("position_ids")})
    state["model.visual_projection.weight"] = visual_projection.weight
    state.update({f"model.prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()})
    state.update({f"model.mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()})
    state.update({f"model.text_hidden_fcs_det.{k}": v for k, v in fcs_det.state_dict().items()})
    state.update({f"model.text_hidden_fcs_seg.{k}": v for k, v in fcs_seg.state_dict().items()})
    state["lm_head.weight"] = lm_state["lm_head.weight"]
    lm_keys.add("lm_head.weight")
    state = {k: v.detach().to(lm_dtype if k in lm_keys else torch.float32).clone().contiguous()
             for k, v in state.items()}

    # Two shards in state-dict order: the first ends inside the LLaMA layers (after layer L//2's attention).
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    last_first = f"model.layers.{sizes['num_hidden_layers'] // 2}.self_attn."
    shards: list = [{}, {}]
    current = 0
    for key, value in state.items():
        shards[current][key] = value
        if current == 0 and key.startswith(last_first) and (key.endswith("inv_freq") or
                                                              (not include_inv_freq and "o_proj" in key)):
            current = 1
    for name, shard in zip(names, shards):
        torch.save(shard, os.path.join(folder, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    _dump_json(os.path.join(folder, "pytorch_model.bin.index.json"), {
        "metadata": {"total_size": total},
        "weight_map": {key: names[i] for i, shard in enumerate(shards) for key in shard}})

    return {
        "folder": folder, "vision_tower": vision_tower, "vocab_size": vocab_size, "sp_vocab_size": sp_vocab_size,
        "added_tokens": dict(added), "loc_token_id": added["[LOC]"], "im_start_id": added["<im_start>"],
        "im_end_id": added["<im_end>"], "im_patch_id": added.get("<im_patch>"), "bos_id": 1, "eos_id": 2,
        "pad_id": 0, "unk_id": 0, "mm_hidden_size": mm_hidden_size,
        "num_image_tokens": (clip_vision.image_size // clip_vision.patch_size) ** 2, "answer_ids": answer_ids,
        "sizes": dict(sizes, grid=grid, low_res_mask_size=4 * grid), "lm_dtype": str(lm_dtype),
        "shards": {name: list(shard) for name, shard in zip(names, shards)}, "total_size": total,
    }


# ----------------------------------------------------------------------------------------------------------------
# Reference: what the original SEAL code computes
# ----------------------------------------------------------------------------------------------------------------

def expand2square_top_left(image: Image.Image, background_color) -> Image.Image:
    """`expand2square` of `VisualSearch/utils/utils.py`: paste the image at (0, 0) (top-left, NOT centred as in
    LLaVA's conversation.py) on a square canvas of the longer side filled with `background_color`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, (0, 0))
    return canvas


def owlvit_box_bias(grid: int) -> torch.Tensor:
    """`OwlViT.compute_box_bias` (VisualSearch/model/owlvit/owlvit.py), float32 (grid*grid, 4): for patch
    k = row*grid + col, the logit of its bottom-right corner ((col+1)/grid, (row+1)/grid) and of the size 1/grid, each
    as log(p + 1e-4) - log1p(-p + 1e-4)."""
    steps = torch.arange(1, grid + 1, dtype=torch.float32) / grid
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    corners = torch.stack([cols, rows], dim=-1).reshape(grid * grid, 2).clamp(0.0, 1.0)
    coord_bias = torch.log(corners + 1e-4) - torch.log1p(-corners + 1e-4)
    size = torch.full_like(coord_bias, 1.0 / grid)
    size_bias = torch.log(size + 1e-4) - torch.log1p(-size + 1e-4)
    return torch.cat([coord_bias, size_bias], dim=-1)


def _count_children(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


class SealReference:
    """What the original SEAL visual search model computes for one image and one prompt, from a checkpoint folder, in
    float32 (the original runs in bf16).

    Written from the description of `visual_search.py` (`VSM.inference`: prompt, the two image views),
    `VisualSearch/model/VSM.py` (`VSMForCausalLM.inference`), `VisualSearch/model/owlvit/owlvit.py`
    (`get_visual_embs`, class / box predictors), `VisualSearch/model/llava/` (`tokenizer_image_token`, the CLIP tower,
    the `-200` splice) and the SAM copy in `VisualSearch/model/segment_anything/` (Meta's classes are used, with SEAL's
    `output_upscaling` and its text-prompt path re-implemented). No VSM project code.

    Arguments: `vision_tower` overrides the config's CLIP folder; `tokenize_chunk(text) -> ids` is the per-chunk
    tokenizer of `prompt_ids` (default: `original_checkpoints.SentencePieceChunkTokenizer`, transformers 4.31's slow
    LlamaTokenizer); `owlvit_num_heads` (default hidden // 64, 12 for B/16) and `mask_decoder_heads` (default 8) are the
    two sizes the checkpoint does not record. Every other size is read off the config and the weights.
    """

    def __init__(self, folder, vision_tower=None, tokenize_chunk: Optional[Callable[[str], list]] = None,
                 owlvit_num_heads: Optional[int] = None, mask_decoder_heads: int = SEAL_MASK_DECODER_HEADS):
        from transformers import (CLIPImageProcessorPil, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                                  OwlViTImageProcessorPil, OwlViTVisionConfig, OwlViTVisionModel)

        self.folder = str(folder)
        with open(os.path.join(self.folder, "config.json"), encoding="utf-8") as handle:
            self.config = c = json.load(handle)
        with open(os.path.join(self.folder, "added_tokens.json"), encoding="utf-8") as handle:
            self.added_tokens = json.load(handle)
        self.loc_token_id = self.added_tokens["[LOC]"]
        self.bos_id, self.eos_id = c.get("bos_token_id", 1), c.get("eos_token_id", 2)
        self.vision_tower = str(vision_tower or c.get("vision_tower") or c["mm_vision_tower"])
        self.tokenize_chunk = tokenize_chunk or SentencePieceChunkTokenizer(self.folder)
        state = {k: v.float() for k, v in load_lisa_state_dict(self.folder).items()}

        # LLaVA-LLaMA: LlamaForCausalLM on the checkpoint's LLaMA keys (the rotary inv_freq buffers are recomputed).
        lm_config = LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
            hidden_act=c.get("hidden_act", "silu"), tie_word_embeddings=False, bos_token_id=self.bos_id,
            eos_token_id=self.eos_id, pad_token_id=c.get("pad_token_id", 0))
        lm_config._attn_implementation = "eager"
        self.lm = LlamaForCausalLM(lm_config)
        self.lm.load_state_dict({k: v for k, v in state.items()
                                 if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm."))
                                 and not k.endswith("rotary_emb.inv_freq") or k == "lm_head.weight"}, strict=True)
        H = c["hidden_size"]
        self.projector = nn.Linear(c["mm_hidden_size"], H)  # llava_arch.py: a single Linear
        self.projector.load_state_dict(sub_state(state, "model.mm_projector."), strict=True)
        self.fcs_det = _text_hidden_fcs(H, c["out_dim"])[0]
        self.fcs_det.load_state_dict(sub_state(state, "model.text_hidden_fcs_det.0."), strict=True)
        seg_out = state["model.text_hidden_fcs_seg.0.2.weight"].shape[0]
        self.fcs_seg = _text_hidden_fcs(H, seg_out)[0]
        self.fcs_seg.load_state_dict(sub_state(state, "model.text_hidden_fcs_seg.0."), strict=True)

        # OWL-ViT vision model (google/owlvit-base-patch16's architecture, sizes read off the weights).
        owl = sub_state(state, "model.owlvit.")
        patch = owl["vision_model.embeddings.patch_embedding.weight"]
        owl_hidden, patch_size = patch.shape[0], patch.shape[-1]
        self.grid = int(round(math.sqrt(owl["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)))
        self.owlvit_image_size = self.grid * patch_size
        owl_config = OwlViTVisionConfig(
            hidden_size=owl_hidden, intermediate_size=owl["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=_count_children(owl, "vision_model.encoder.layers."),
            num_attention_heads=owlvit_num_heads or owl_hidden // OWLVIT_HEAD_DIM, image_size=self.owlvit_image_size,
            patch_size=patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        owl_config._attn_implementation = "eager"
        self.owlvit_vision = OwlViTVisionModel(owl_config)
        self.owlvit_vision.load_state_dict(
            {k: v for k, v in owl.items() if k.startswith("vision_model.")}, strict=False)
        missing = {k for k in self.owlvit_vision.state_dict() if not k.endswith("position_ids")} - set(owl)
        if missing:
            raise KeyError(f"OWL-ViT vision weights missing from the checkpoint: {sorted(missing)}")
        self.owl_heads = {k: v for k, v in owl.items() if not k.startswith("vision_model.")}  # class/box head, LN

        # Mask branch: visual_projection (no bias), Meta's PromptEncoder, the modified MaskDecoder.
        self.visual_projection = state["model.visual_projection.weight"]
        D = self.visual_projection.shape[0]
        pe_state = sub_state(state, "model.prompt_encoder.")
        self.prompt_encoder = build_seal_prompt_encoder(D, self.grid, self.owlvit_image_size,
                                                        pe_state["mask_downscaling.3.weight"].shape[0])
        self.prompt_encoder.load_state_dict(pe_state, strict=True)
        md_state = sub_state(state, "model.mask_decoder.")
        self.mask_decoder = build_seal_mask_decoder(D, md_state["transformer.layers.0.mlp.lin1.weight"].shape[0],
                                                    mask_decoder_heads)
        self.mask_decoder.load_state_dict(md_state, strict=True)

        # CLIP tower and processors (PIL backends: torchvision is never used).
        with quiet_transformers():
            self.clip = CLIPVisionModel.from_pretrained(self.vision_tower, torch_dtype=torch.float32,
                                                        attn_implementation="eager")
            self.clip_processor = CLIPImageProcessorPil.from_pretrained(self.vision_tower)
        self.owlvit_processor = OwlViTImageProcessorPil(
            size={"height": self.owlvit_image_size, "width": self.owlvit_image_size}, do_resize=True,
            resample=Image.BICUBIC, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=list(self.clip_processor.image_mean), image_std=list(self.clip_processor.image_std))
        for module in (self.lm, self.projector, self.fcs_det, self.fcs_seg, self.owlvit_vision, self.prompt_encoder,
                       self.mask_decoder, self.clip):
            module.float().eval().requires_grad_(False)

    # -- prompt ---------------------------------------------------------------------------------------------------
    def prompt(self, question: str, answer: Optional[str] = None) -> str:
        """`VSM.inference`'s prompt: llava_v1 with "<im_start><image><im_end>\\n{question}" as the user turn, ending
        "ASSISTANT:"; with `answer` (e.g. `SEAL_ANSWER`) the assistant turn is filled in and closed with "</s>"."""
        return llava_v1_prompt(question, True, answer)

    def prompt_ids(self, question: str, answer: Optional[str] = None) -> list:
        """`tokenizer_image_token(prompt, tokenizer)` (VisualSearch/model/llava/mm_utils.py): per-chunk tokenization
        around "<image>", one BOS, -200 for the image."""
        return tokenizer_image_token(self.prompt(question, answer), self.tokenize_chunk, bos_id=self.bos_id)

    # -- image views ----------------------------------------------------------------------------------------------
    def clip_pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The CLIP view (visual_search.py): top-left `expand2square` with int(255*mean) then CLIPImageProcessor."""
        background = tuple(int(x * 255) for x in self.clip_processor.image_mean)
        square = expand2square_top_left(image, background)
        return self.clip_processor.preprocess(square, return_tensors="pt")["pixel_values"].float()

    def owlvit_pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The OWL-ViT view (visual_search.py, `OwlViTProcessor` of google/owlvit-base-patch16 on `np.array(image)`):
        stretch to SxS with PIL bicubic (no aspect ratio, no crop), /255, CLIP mean/std."""
        return self.owlvit_processor(images=np.array(image), return_tensors="pt")["pixel_values"].float()

    # -- pieces ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """`encode_images`: CLIPVisionModel hidden_states[mm_vision_select_layer (-2)] without CLS, then mm_projector:
        (num_patches, hidden)."""
        out = self.clip(pixel_values=self.clip_pixel_values(image), output_hidden_states=True)
        features = out.hidden_states[self.config.get("mm_vision_select_layer", -2)][:, 1:]
        return self.projector(features)[0]

    @torch.no_grad()
    def owlvit_feature_map(self, image: Image.Image) -> torch.Tensor:
        """`OwlViT.get_visual_embs`: post_layernorm over the whole last hidden state, patches times the CLS token,
        `owlvit.layer_norm` (eps 1e-5), reshaped row-major to (1, g, g, C)."""
        hidden = self.owlvit_vision(pixel_values=self.owlvit_pixel_values(image)).last_hidden_state
        hidden = self.owlvit_vision.vision_model.post_layernorm(hidden)
        merged = hidden[:, 1:] * hidden[:, :1]
        merged = F.layer_norm(merged, merged.shape[-1:], self.owl_heads["layer_norm.weight"],
                              self.owl_heads["layer_norm.bias"], eps=1e-5)
        return merged.reshape(1, self.grid, self.grid, merged.shape[-1])

    def _embeddings(self, ids: Sequence[int], image_features: torch.Tensor) -> torch.Tensor:
        """`prepare_inputs_labels_for_multimodal` (mm_use_im_start_end branch, one image): tokens before -200,
        the image features, the rest; positions 0..T'-1."""
        if ids.count(IMAGE_TOKEN_INDEX) != 1:
            raise ValueError("the SEAL reference expects exactly one image token (-200) in input_ids")
        at = ids.index(IMAGE_TOKEN_INDEX)
        embed = self.lm.model.embed_tokens
        return torch.cat([embed(torch.tensor(ids[:at], dtype=torch.long)), image_features,
                          embed(torch.tensor(ids[at + 1:], dtype=torch.long))])

    @torch.no_grad()
    def _lm(self, ids: Sequence[int], image_features: torch.Tensor):
        """One full forward without a cache: (logits (1, T', V), final post-RMSNorm hidden states (T', H)), the
        tensor `LlavaLlamaForCausalLM.forward` returns as `hidden_states` in eval mode."""
        embeds = self._embeddings(list(ids), image_features)[None]
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                               use_cache=False).last_hidden_state
        return self.lm.lm_head(hidden), hidden[0]

    def loc_rows(self, ids: Sequence[int], num_image_tokens: int) -> list:
        """Rows of the image-expanded hidden states that `VSMForCausalLM.inference` reads for the [LOC] tokens of
        `ids`: mask = `ids[1:] == [LOC]` prefixed by (num_image_tokens - 1) Falses (the code's 255 for 256 CLIP
        patches), so a [LOC] at token index j gives row j - 1 + (num_image_tokens - 1): the hidden state of the
        position just before the [LOC] (the one whose logits predict it), in expanded coordinates."""
        ids = list(ids)
        image_at = ids.index(IMAGE_TOKEN_INDEX)
        rows = []
        for j in range(1, len(ids)):
            if ids[j] == self.loc_token_id:
                if j < image_at:
                    raise ValueError("a [LOC] before the image: the original's fixed offset does not handle it")
                rows.append(j - 1 + num_image_tokens - 1)
        return rows

    @torch.no_grad()
    def detect(self, feature_map: torch.Tensor, det_queries: torch.Tensor):
        """`OwlViT.forward` with one query per [LOC] (n, out_dim): HF `OwlViTClassPredictionHead` with query_mask None
        (dense0, L2 normalisation +1e-6 on both sides, dot product, + logit_shift, * (elu(logit_scale) + 1)) and the
        box head (dense0-GELU-dense1-GELU-dense2) + `owlvit_box_bias`, sigmoid. Returns pred_logits (n, g*g) and
        pred_boxes (n, g*g, 4) cxcywh in [0, 1] of the stretched view."""
        h = self.owl_heads
        n = det_queries.shape[0]
        feats = feature_map.reshape(1, -1, feature_map.shape[-1]).expand(n, -1, -1)
        class_embeds = F.linear(feats, h["class_head.dense0.weight"], h["class_head.dense0.bias"])
        class_embeds = class_embeds / (torch.linalg.norm(class_embeds, dim=-1, keepdim=True) + 1e-6)
        queries = det_queries[:, None, :]
        queries = queries / (torch.linalg.norm(queries, dim=-1, keepdim=True) + 1e-6)
        logits = torch.einsum("npd,nqd->npq", class_embeds, queries)
        shift = F.linear(feats, h["class_head.logit_shift.weight"], h["class_head.logit_shift.bias"])
        scale = F.elu(F.linear(feats, h["class_head.logit_scale.weight"], h["class_head.logit_scale.bias"])) + 1
        pred_logits = ((logits + shift) * scale)[..., 0]
        boxes = F.gelu(F.linear(feats, h["box_head.dense0.weight"], h["box_head.dense0.bias"]))
        boxes = F.gelu(F.linear(boxes, h["box_head.dense1.weight"], h["box_head.dense1.bias"]))
        boxes = F.linear(boxes, h["box_head.dense2.weight"], h["box_head.dense2.bias"])
        pred_boxes = torch.sigmoid(boxes + owlvit_box_bias(self.grid))
        return pred_logits, pred_boxes

    @torch.no_grad()
    def segment(self, feature_map: torch.Tensor, seg_queries: torch.Tensor, original_size):
        """The mask branch of `VSMForCausalLM.inference`: sparse prompt = the seg queries (n, 1, D) (SEAL's prompt
        encoder appends `text_embeds` after no points / boxes), dense = `no_mask_embed` broadcast to g x g, image =
        `visual_projection(feature_map)` as (1, D, g, g), image_pe = `get_dense_pe()`, `multimask_output=False`, then
        fp32 bilinear (align_corners False) straight to the original (H, W). Returns (mask logits (n, H, W),
        low-res logits (n, 4g, 4g), iou predictions (n,))."""
        n = seg_queries.shape[0]
        D = self.visual_projection.shape[0]
        if n == 0:
            g4 = 4 * self.grid
            return (torch.zeros((0, *original_size)), torch.zeros((0, g4, g4)), torch.zeros((0,)))
        image_embeddings = F.linear(feature_map, self.visual_projection).permute(0, 3, 1, 2)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, D, 1, 1).expand(n, D, self.grid, self.grid)
        low_res, iou = self.mask_decoder(image_embeddings=image_embeddings,
                                         image_pe=self.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=seg_queries[:, None, :],
                                         dense_prompt_embeddings=dense, multimask_output=False)
        masks = F.interpolate(low_res.float(), tuple(original_size), mode="bilinear", align_corners=False)
        return masks[:, 0], low_res[:, 0], iou[:, 0]

    @torch.no_grad()
    def _heads(self, image: Image.Image, hidden: torch.Tensor, rows: list) -> dict:
        """Detection and mask outputs for the given hidden-state rows, plus the box selection of visual_search.py."""
        width, height = image.size
        queries = hidden[rows]
        det_queries, seg_queries = self.fcs_det(queries), self.fcs_seg(queries)
        feature_map = self.owlvit_feature_map(image)
        pred_logits, pred_boxes = self.detect(feature_map, det_queries)
        masks, low_res, iou = self.segment(feature_map, seg_queries, (height, width))
        scores = pred_logits.sigmoid()
        if len(rows):
            best = scores.argmax(dim=-1)
            cx, cy, w, h = (pred_boxes[torch.arange(len(rows)), best]
                            * torch.tensor([width, height, width, height], dtype=torch.float32)).unbind(-1)
            box_xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
            box_xywh = torch.stack([cx - w / 2, cy - h / 2, w, h], dim=-1)
            best_score = scores.gather(1, best[:, None])[:, 0]
        else:
            best = torch.zeros((0,), dtype=torch.long)
            box_xyxy = box_xywh = torch.zeros((0, 4))
            best_score = torch.zeros((0,))
        return {"loc_rows": rows, "loc_queries": queries, "det_queries": det_queries, "seg_queries": seg_queries,
                "feature_map": feature_map, "pred_logits": pred_logits, "pred_boxes": pred_boxes, "scores": scores,
                "best_index": best, "box_xyxy": box_xyxy, "box_xywh": box_xywh, "box_score": best_score,
                "mask_logits": masks, "heatmaps": masks.clamp(min=0), "low_res_masks": low_res,
                "iou_predictions": iou}

    # -- the two entry points -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, image: Image.Image, input_ids: Sequence[int]) -> dict:
        """Teacher-forced forward on `input_ids` (one -200), e.g. `prompt_ids(question, SEAL_ANSWER)`. Returns float32:

        - `logits` (1, T + N - 1, V) over the image-expanded sequence (N = number of CLIP patches), `num_image_tokens`;
        - for the n [LOC] tokens of `input_ids`, in order: `loc_rows`, `loc_queries` (n, H) (post-norm hidden state
          of the position before each [LOC]), `det_queries` (n, out_dim), `seg_queries` (n, D);
        - `feature_map` (1, g, g, C) OWL-ViT features; `pred_logits` (n, g*g), `pred_boxes` (n, g*g, 4) cxcywh in
          [0, 1]; `scores` = sigmoid(pred_logits); `best_index` (n,) argmax patch; `box_xyxy` (n, 4) and `box_xywh`
          (n, 4, visual_search.py's format) of that patch's box in original-image pixels (cx, cy, w, h times W, H, W,
          H); `box_score` (n,) its sigmoid score;
        - `mask_logits` (n, H, W) at the original size, `heatmaps` = their clamp(min=0) (the search's target cue),
          `low_res_masks` (n, 4g, 4g), `iou_predictions` (n,).
        """
        ids = [int(i) for i in input_ids]
        features = self.image_features(image)
        logits, hidden = self._lm(ids, features)
        out = self._heads(image, hidden, self.loc_rows(ids, features.shape[0]))
        return {"logits": logits, "num_image_tokens": features.shape[0], **out}

    @torch.no_grad()
    def generate(self, image: Image.Image, input_ids: Sequence[int], max_new_tokens: int = 100) -> dict:
        """`VSMForCausalLM.inference`: greedy decoding (num_beams 1) without a KV cache (config use_cache false:
        every step re-runs the whole sequence, image included), stopping after `</s>` (kept) or `max_new_tokens`. The
        [LOC] queries come from the LAST step's hidden states (the final sequence minus its last token) at the rows
        before each [LOC] of the final sequence (`output_ids[:, 1:]`, the prompt included). Returns `sequences`
        (prompt + new ids, the -200 kept, as `outputs.sequences`), `new_ids`, `logits` of the last step, and the
        same detection / mask entries as `forward`."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        ids = [int(i) for i in input_ids]
        features = self.image_features(image)
        new: list = []
        for _ in range(max_new_tokens):
            logits, hidden = self._lm(ids + new, features)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == self.eos_id:
                break
        sequence = ids + new
        out = self._heads(image, hidden, self.loc_rows(sequence, features.shape[0]))
        return {"sequences": sequence, "new_ids": new, "logits": logits, "num_image_tokens": features.shape[0], **out}


__all__ = [
    "IMAGE_TOKEN_INDEX", "LLAVA_V1_SYSTEM", "OWLVIT_HEAD_DIM", "SEAL_ANSWER", "SEAL_MASK_DECODER_HEADS",
    "SEAL_PROMPT_TEMPLATE", "SealReference", "SealUpsample", "TINY_SEAL_SIZES", "build_seal_mask_decoder",
    "build_seal_prompt_encoder", "expand2square_top_left", "owlvit_box_bias", "write_tiny_seal",
]

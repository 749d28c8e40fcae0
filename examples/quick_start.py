"""Quick start: load a saved VSM with plain transformers and segment what an instruction describes.

    python examples/quick_start.py --model outputs/vsm-tiny --image photo.jpg --prompt "Please segment the red shape."

Without --image it draws a scene of the built-in synthetic data (held-out split). Only transformers, torch and
PIL are needed to run the model: the folder carries its own code (`trust_remote_code=True`).
"""

import argparse

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/vsm-tiny", help="a saved VSM folder or Hub id")
    parser.add_argument("--image", help="an image file (default: a synthetic held-out scene)")
    parser.add_argument("--prompt", default="Please segment the red shape.")
    parser.add_argument("--overlay", help="write the masks drawn on the image to this PNG")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        from modeling_vsm.data import load_synthetic  # this project's data, only for the default scene

        image = load_synthetic("test", num_samples=1)[0]["image"]

    # The instruction comes before the image (the chat template keeps the order of the content parts).
    messages = [{"role": "user", "content": [{"type": "text", "text": args.prompt}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    sizes = inputs.pop("original_sizes")
    with torch.no_grad():
        outputs = model.generate(**inputs, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    result = processor.post_process_generation(outputs, target_sizes=sizes.tolist())[0]

    print("answer:", result["text"])
    print("masks:", tuple(result["masks"].shape), "pixels per mask:", result["masks"].flatten(1).sum(1).tolist())
    print("boxes (xyxy pixels):", result["boxes"].tolist(), "scores:", result["scores"].tolist())
    if args.overlay:
        pixels = np.asarray(image, dtype=np.float32)
        for mask in result["masks"].numpy():
            pixels[mask] = 0.5 * pixels[mask] + 0.5 * np.array([255, 64, 64])
        Image.fromarray(pixels.astype(np.uint8)).save(args.overlay)
        print("overlay:", args.overlay)


if __name__ == "__main__":
    main()

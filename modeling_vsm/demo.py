"""`vsm demo`: a local Gradio app. Image + instruction -> the answer text, the masks drawn on the image, the boxes.

Gradio is an optional dependency (`pip install -e ".[demo]"`): it is imported here only, when a demo is built,
never when `modeling_vsm` is imported.
"""

import html

from .evaluation import draw_overlay, predict, prompt_text

EXAMPLE_INSTRUCTION = "Please segment the red shape."
DESCRIPTION = "A VSM answers in text; each <SEG> in the answer becomes a mask, each <loc> a box."


def answer(model, processor, image, instruction: str, max_new_tokens: int) -> tuple:
    """One prediction for the app: (answer text, overlay image, {"boxes", "scores", "mask_areas"})."""
    if image is None:
        raise ValueError("Upload an image first.")
    if not instruction or not instruction.strip():
        raise ValueError("Type an instruction, e.g. '" + EXAMPLE_INSTRUCTION + "'")
    image = image.convert("RGB")
    prompt = prompt_text(processor, [{"role": "user", "content": instruction.strip()}])  # the image where its template wants it
    result = predict(model, processor, [image], [prompt], max_new_tokens)[0]
    details = {
        "boxes": [[round(v, 1) for v in box] for box in result["boxes"].tolist()],  # xyxy pixels
        "scores": [round(v, 4) for v in result["scores"].tolist()],
        "mask_areas": [int(mask.sum()) for mask in result["masks"]],
    }
    return result["text"], draw_overlay(image, result["masks"], result["boxes"]), details


def build_demo(model, processor, max_new_tokens: int = 24, title: str = "VSM demo"):
    """The Gradio app (a `gr.Interface`, API endpoint `/predict`): (image, instruction) -> (text, overlay, details)."""
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError(f"`vsm demo` needs gradio: pip install -e \".[demo]\" ({error})") from None

    def run(image, instruction):
        try:
            return answer(model, processor, image, instruction, max_new_tokens)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    return gr.Interface(
        fn=run,
        inputs=[gr.Image(type="pil", label="image"), gr.Textbox(label="instruction", value=EXAMPLE_INSTRUCTION)],
        outputs=[gr.Textbox(label="answer"), gr.Image(type="pil", label="masks and boxes"), gr.JSON(label="details")],
        title=title,
        # Gradio renders the description as HTML: the special tokens are escaped, or `<SEG>` is taken for a tag that
        # swallows the rest of the text in a browser.
        description=html.escape(DESCRIPTION),
        flagging_mode="never",
        analytics_enabled=False,  # local only: no usage reporting
        api_name="predict",
    )

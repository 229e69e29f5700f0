"""The demo page: a Gradio app with a caption, a generate and an edit tab over one Pipeline (`capdiff demo CKPT`).

    from capdiff.demo import build, launch
    launch(Pipeline.from_checkpoint("last.ckpt"), port=7860)   # serves http://127.0.0.1:7860 until interrupted

Needs the `demo` extra (gradio). The page is served on 127.0.0.1 only, with Gradio's analytics and version
check off, no share link and no run history, so it sends nothing off the machine and works without a network
(the default theme's fonts are local ones).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

# Gradio reads this when a Blocks is made; off before gradio is imported, whatever the environment says.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr

from capdiff.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler, usable_samplers

if TYPE_CHECKING:
    from PIL import Image

    from capdiff.pipeline import Pipeline

HOST = "127.0.0.1"
MAX_IMAGES = 8
INVERSION, SDEDIT = "DDIM inversion", "SDEdit"


def build(pipe: Pipeline, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER) -> gr.Blocks:
    """The page for `pipe`; `steps` and `sampler` are the controls' initial sampler settings (the edit tab's
    sampler is SDEdit's: inversion is DDIM). Tabs whose part the model lacks (a model trained without the
    captioner or the UNet) say so instead of failing."""
    diffusion = getattr(pipe.model, "diffusion", None)
    zero_snr = diffusion is not None and diffusion.zero_terminal_snr
    samplers = list(dict.fromkeys([check_sampler(sampler, "sampler", zero_snr), *usable_samplers(zero_snr)]))
    lock = threading.Lock()  # Gradio runs events in worker threads; the model runs one request at a time
    # Uploads keep their own mode (image_mode=None): the Pipeline composites transparency on white, as training
    # decodes shard images, where Gradio's default RGB conversion would drop the alpha channel.
    has_captioner = pipe.model.can_caption
    has_generator = pipe.model.can_generate
    has_unet = getattr(pipe.model, "diffusion", None) is not None  # editing inverts latents: a GAN cannot

    def caption(image: Image.Image | None, num_beams: int) -> str:
        if image is None:
            raise gr.Error("Upload an image first.")
        with lock:
            return pipe.caption([image], num_beams=int(num_beams))[0]

    def generate(
        prompt: str, count: int, sampler: str, steps: int, guidance_scale: float, seed: int
    ) -> list[Image.Image]:
        if not prompt.strip():
            raise gr.Error("Write a prompt first.")
        with lock:
            return pipe.generate(
                [prompt] * int(count), steps=int(steps), guidance_scale=float(guidance_scale), seed=int(seed or 0),
                sampler=sampler,
            )  # fmt: skip

    def edit(
        image: Image.Image | None,
        prompt: str,
        method: str,
        strength: float,
        sampler: str,
        steps: int,
        guidance_scale: float,
    ) -> Image.Image:
        if image is None:
            raise gr.Error("Upload an image first.")
        if not prompt.strip():
            raise gr.Error("Write what the image should show first.")
        if method == INVERSION and not has_captioner:
            raise gr.Error("This model has no captioner to describe the source image: choose SDEdit.")
        with lock:
            return pipe.edit(
                image,
                prompt,
                steps=int(steps),
                guidance_scale=float(guidance_scale),
                strength=float(strength) if method == SDEDIT else None,
                sampler=sampler if method == SDEDIT else None,
            )

    def sampling_controls(label: str) -> tuple[gr.Dropdown, gr.Slider, gr.Slider]:
        return (
            gr.Dropdown(samplers, value=samplers[0], label=label),
            gr.Slider(1, 200, value=steps, step=1, label="Steps"),
            gr.Slider(1, 12, value=4.0, step=0.5, label="Guidance scale"),
        )

    with gr.Blocks(title="capdiff", analytics_enabled=False) as page:
        gr.Markdown(f"## capdiff\n{pipe.image_size}×{pipe.image_size} images; inputs are resized and centre-cropped.")
        with gr.Tab("Caption", elem_id="caption-tab"):
            if has_captioner:
                with gr.Row():
                    source = gr.Image(
                        type="pil",
                        image_mode=None,
                        label="Image",
                        sources=["upload", "clipboard"],
                        elem_id="caption-image",
                    )
                    with gr.Column():
                        beams = gr.Slider(1, 8, value=1, step=1, label="Beams (1: greedy)")
                        run = gr.Button("Caption", variant="primary", elem_id="caption-run")
                        text = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")
                run.click(caption, [source, beams], text)
            else:
                gr.Markdown("This model was trained without the captioner (`model.loss.weights.caption=0`).")
        with gr.Tab("Generate", elem_id="generate-tab"):
            if has_generator:
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", elem_id="generate-prompt")
                        count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                        chosen, steps_slider, guidance = sampling_controls("Sampler")
                        seed = gr.Number(0, precision=0, label="Seed (image i uses seed + i)")
                        run = gr.Button("Generate", variant="primary", elem_id="generate-run")
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="generate-gallery")
                inputs = [prompt, count, chosen, steps_slider, guidance, seed]
                run.click(generate, inputs, gallery)
                prompt.submit(generate, inputs, gallery)
            else:
                gr.Markdown("This model has no image generator (`model.loss.weights.diffusion=0`).")
        with gr.Tab("Edit", elem_id="edit-tab"):
            if has_unet:
                with gr.Row():
                    with gr.Column():
                        original = gr.Image(
                            type="pil",
                            image_mode=None,
                            label="Image",
                            sources=["upload", "clipboard"],
                            elem_id="edit-image",
                        )
                        target = gr.Textbox(label="What it should show", elem_id="edit-prompt")
                        method = gr.Radio(
                            [INVERSION, SDEDIT],
                            value=INVERSION if has_captioner else SDEDIT,
                            label="Method (inversion: under the model's caption of the image)",
                        )
                        strength = gr.Slider(0.05, 1, value=0.6, step=0.05, label="SDEdit strength (lower keeps more)")
                        chosen, steps_slider, guidance = sampling_controls("SDEdit sampler (inversion is DDIM)")
                        run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                    edited = gr.Image(type="pil", label="Edited", interactive=False, elem_id="edit-result")
                run.click(edit, [original, target, method, strength, chosen, steps_slider, guidance], edited)
            else:
                gr.Markdown(
                    "Editing needs a latent diffusion UNet (a model trained with "
                    "`model.loss.weights.diffusion=0`, or a GAN, has none)."
                )
    return page


def launch(
    pipe: Pipeline, port: int = 7860, block: bool = True, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER
) -> gr.Blocks:
    """Serve `build(pipe)` on http://127.0.0.1:`port`. With `block`, until interrupted (then closed); without,
    returns the running page at once (`page.local_url`; stop it with `page.close()`). An OSError when the port
    is taken."""
    page = build(pipe, steps=steps, sampler=sampler)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        show_error=True,
        ssr_mode=False,
        run_history=False,
        quiet=True,  # Gradio's own banner suggests a public share link, which this page never makes
    )
    if block:
        print(f"capdiff demo: serving {page.local_url} (Ctrl-C stops it)", flush=True)
        try:
            page.block_thread()
        finally:
            page.close()
    return page

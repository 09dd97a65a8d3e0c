"""MiniCanvas: a tiny text-to-image world shipped with the pack so SPARE can be tried and benchmarked on a CPU, with no
checkpoint to download. It draws 32 x 32 px images of a shape (object) in a style from prompts written with a fixed
53-word vocabulary, e.g. "A star image in ukiyo style.".

- `data`: the vocabulary, prompt templates and the procedural renderer of the training images (styles x objects);
- `model`: MiniCanvas, a pixel-space UNet (SD 1.x module names) with its tokenizer, text encoder and sampler;
- `flux_model`: MiniCanvas-Flux, ComfyUI's own Flux class at a tiny size, trained with rectified flow (it imports
  ComfyUI, lazily, only when a model is built).

Both models' weights are in `weights/`. The SPARE Demo Model node (nodes/demo_model.py) serves them to ComfyUI; the
benchmark (bench/minicanvas) trains and judges erasures on them. Nothing here imports ComfyUI at import time.
"""

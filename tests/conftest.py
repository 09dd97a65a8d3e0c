"""Test set-up: the repository root on sys.path (spare_core, bench) without importing the pack's root __init__.py,
which needs ComfyUI. Tests that need ComfyUI use tests/comfy_fixtures.py and skip without COMFYUI_PATH."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

torch.set_num_threads(1)  # the tiny test models are overhead-bound: one thread is fastest and steady

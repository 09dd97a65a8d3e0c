"""SPARE for ComfyUI: concept erasure nodes. ComfyUI imports this file; it needs ComfyUI's `comfy_api`.
The engine, `spare_core`, is importable on its own (no ComfyUI)."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # spare_core is imported as a top-level package by the nodes
    sys.path.insert(0, _HERE)

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from .nodes.spare_nodes import NODES  # noqa: E402


class SpareExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SpareExtension:
    return SpareExtension()

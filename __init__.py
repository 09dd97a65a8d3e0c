"""SPARE for ComfyUI: concept erasure nodes. ComfyUI imports this file (V3 entry point `comfy_entrypoint`).
The engine, `spare_core`, is importable on its own (no ComfyUI)."""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the nodes import spare_core as a top-level package
    sys.path.insert(0, _HERE)

# Outside ComfyUI (pytest collects the repository root as a package) there is no comfy_api: expose nothing then.
# Inside ComfyUI comfy_api always exists, so a real import error there still surfaces.
if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension, io

    from .nodes.spare_nodes import NODES

    class SpareExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES)

    async def comfy_entrypoint() -> SpareExtension:
        return SpareExtension()

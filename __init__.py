"""SPARE for ComfyUI: concept erasure nodes. ComfyUI imports this file (V3 entry point `comfy_entrypoint`).
The engine, `spare_core`, is importable on its own (no ComfyUI)."""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if "spare_core" not in sys.modules:
    # The nodes import the engine as the top-level package `spare_core`. Register exactly that one name instead of
    # putting the pack root on sys.path, which would expose `nodes` (ComfyUI's own module name), `tests`, `bench`.
    _spec = importlib.util.spec_from_file_location(
        "spare_core", os.path.join(_HERE, "spare_core", "__init__.py"),
        submodule_search_locations=[os.path.join(_HERE, "spare_core")])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["spare_core"] = _module
    _spec.loader.exec_module(_module)

# Outside ComfyUI (pytest collects the repository root as a package) there is no comfy_api: expose nothing then.
# Inside ComfyUI comfy_api always exists, so a real import error there still surfaces.
if importlib.util.find_spec("comfy_api") is not None:
    from comfy_api.latest import ComfyExtension, io

    from .nodes.spare_nodes import NODES
    try:  # SPARE Demo Model (MiniCanvas): the bundled spare_core.minicanvas models as MODEL/CLIP/VAE/LATENT
        from .nodes.demo_model import DEMO_NODES
    except Exception:  # a broken demo must not take the SPARE nodes down with it; the traceback is logged
        import logging
        logging.getLogger("spare").exception("SPARE: the demo model node could not be loaded")
        DEMO_NODES = []

    class SpareExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODES) + list(DEMO_NODES)

    async def comfy_entrypoint() -> SpareExtension:
        return SpareExtension()

"""ComfyUI nodes of the pack (schemas + translation to spare_core only). Imported only inside ComfyUI."""

"""The engine's version (`spare_core.__version__`, written into every LoRA file's metadata as "spare.version"). Its own
module so that distill.py can read it without importing the package that imports distill.py."""
__version__ = "0.1.0"

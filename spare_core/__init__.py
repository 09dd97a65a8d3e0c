"""SPARE (Self-distillation for PARameter-Efficient Removal), host-independent engine.

Options of each stage: config.py (one dataclass per stage; field names = the node inputs). pipeline.py runs the whole
method (`erase`: concept samples -> saliency -> profile -> distill) and fixes the sample order the stages share.
Stages, each one module: saliency.py (which modules carry the concept), timesteps.py (where in the noise schedule),
distill.py (sparse LoRA trained by self-distillation), lora.py (the LoRA file format). adapters.py hooks LoRAs onto a
network: the trainable adapters distill.py trains, and apply_lora for a finished LoRA (it imports lora.py, not the
reverse). No module imports one that imports it back, not even through this file (tests/test_import_graph.py).
Shared helpers, so that stages do not import each other: files.py (atomic writes, reading .safetensors),
autograd.py (freezing, gradient checkpointing), prompts.py (prompt checks, the {a|b} retain builder), sampling.py;
neighbours.py ranks candidate concepts for the retain list (SPARE Nearest Concepts).
Everything operates on a `DiffusionModel` (model.py): ComfyUI's objects are adapted in nodes/host.py. families.py says
what differs per model family (candidate modules, in-place residuals, guidance distillation, file metadata).
"""
from ._version import __version__
from .errors import Cancelled, NonFiniteLossError, SpareInputError  # noqa: E402
from .model import DiffusionModel, lora_targets  # noqa: E402
from .families import FAMILIES, Family  # noqa: E402
from .files import read_safetensors  # noqa: E402
from .adapters import apply_lora  # noqa: E402
from .lora import LoraWeights, load_lora, save_lora  # noqa: E402
from .config import ProfileConfig, ScanConfig  # noqa: E402
from .saliency import Saliency, candidate_modules, scan as saliency_scan  # noqa: E402
from .timesteps import TimestepProfile, profile as timestep_profile, uniform as uniform_profile  # noqa: E402
from .distill import DistillConfig, DistillResult, distill, validate as distill_validate  # noqa: E402
from .config import LOSS_WEIGHTINGS  # noqa: E402
from .sampling import generate  # noqa: E402
from .prompts import expand_alternatives  # noqa: E402
from .pipeline import Erasure, concept_samples, erase  # noqa: E402

__all__ = [
    "FAMILIES", "Family",
    "__version__", "Cancelled", "NonFiniteLossError", "SpareInputError", "DiffusionModel", "lora_targets", "LoraWeights",
    "apply_lora", "load_lora", "read_safetensors", "save_lora", "Saliency", "candidate_modules", "saliency_scan",
    "TimestepProfile",
    "timestep_profile", "uniform_profile", "DistillConfig", "DistillResult", "distill", "distill_validate", "generate",
    "LOSS_WEIGHTINGS", "expand_alternatives", "ScanConfig", "ProfileConfig", "Erasure", "concept_samples", "erase",
]

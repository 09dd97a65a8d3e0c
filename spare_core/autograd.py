"""Autograd helpers shared by the training stages (saliency scan, distill): freezing a network, gradient checkpointing
its blocks, and exact gradients through networks that add residuals in place.

In-place residuals: ComfyUI's Flux, Chroma and SD3 blocks update their residual stream in place (`txt += ...`,
`x += ...`, `img.addcmul_(...)`, comfy/ldm/flux/layers.py, chroma/layers.py, mmdit.py) after a norm has read it. The
norm saved that very tensor for backward, so backward raises "modified by an inplace operation"; under gradient
checkpointing the block also modifies its own input, which the recomputation then reads modified (silently wrong
gradients). `inplace_safe` gives every norm a copy of its input while autograd records (the copy is what backward
keeps; the stream may then change freely), and `gradient_checkpointing(clone_inputs=True)` runs each checkpointed
block on copies of its tensor inputs, so the recomputation starts from the values the forward saw. Both are exact
(tests/test_dit_comfy.py compares with finite differences in fp64). Writing our own out-of-place copies of the
blocks instead would fork ComfyUI's code per family and version; the hooks leave its modules as they are.
"""
from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def frozen(network: nn.Module):
    """Every network parameter requires_grad=False inside; original flags restored after."""
    flags = [(p, p.requires_grad) for p in network.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# Module types whose input a later in-place residual add may modify (by class name: spare_core does not import ComfyUI,
# whose RMSNorm is its own class)
NORM_CLASS_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm", "T5LayerNorm")  # T5LayerNorm: comfy/text_encoders/t5.py


@contextmanager
def inplace_safe(network: nn.Module):
    """Inside, every norm module of `network` (NORM_CLASS_NAMES) reads a copy of its input whenever autograd records
    the call (grad enabled and the input requires grad), so in-place residual adds after it cannot invalidate what
    backward needs. No-grad passes (the teacher, sampling) are untouched. The memory cost is one copy of each norm's
    input per recorded forward (inside a checkpointed block: only while that block is recomputed)."""
    def copy_input(module, args):
        if args and torch.is_tensor(args[0]) and args[0].requires_grad and torch.is_grad_enabled():
            return (args[0].clone(),) + tuple(args[1:])
        return None

    handles = [m.register_forward_pre_hook(copy_input) for m in network.modules()
               if type(m).__name__ in NORM_CLASS_NAMES]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def _copies(value):
    return value.clone() if torch.is_tensor(value) and value.is_floating_point() else value


@contextmanager
def backward_safe(network: nn.Module, checkpointing: bool, inplace_residuals: bool):
    """The autograd set-up of a training stage: gradient checkpointing if asked, and for networks that add residuals
    in place (`DiffusionModel.inplace_residuals`) the copies that keep their gradients exact (see the module doc)."""
    with contextlib.ExitStack() as stack:
        if inplace_residuals:
            stack.enter_context(inplace_safe(network))
        if checkpointing:
            stack.enter_context(gradient_checkpointing(network, clone_inputs=inplace_residuals))
        yield


@contextmanager
def gradient_checkpointing(network: torch.nn.Module, clone_inputs: bool = False):
    """Recompute each block's activations during backward instead of storing them (student passes only; teacher
    passes run without grad and are unaffected). Blocks = the elements of the network's top-level ModuleLists /
    Sequentials (UNet input/middle/output blocks, DiT double/single blocks). The blocks' `forward` is swapped on the
    instance (ComfyUI's trainer does the same) and restored on exit; modules are not restructured. clone_inputs: the
    checkpointed function runs on copies of the block's floating-point tensor inputs, so a block that modifies its
    input in place leaves the saved inputs (what the recomputation reads) as they were."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    for child in network.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for block in child:
                had_own = "forward" in block.__dict__
                original = block.forward

                def forward(*args, _f=original, **kwargs):
                    if torch.is_grad_enabled():
                        run = functools.partial(_on_copies, _f) if clone_inputs else _f
                        return checkpoint(run, *args, use_reentrant=False, **kwargs)
                    return _f(*args, **kwargs)
                block.forward = forward
                patched.append((block, had_own, original))
    try:
        yield len(patched)
    finally:
        for block, had_own, original in patched:
            if had_own:
                block.forward = original
            else:
                del block.forward


def _on_copies(_f, *args, **kwargs):
    return _f(*[_copies(a) for a in args], **{k: _copies(v) for k, v in kwargs.items()})


def feeding(root: nn.Module, paths: list[str], run) -> list[str]:
    """Of `paths` (modules inside `root`), those whose output reaches what `run()` returns (a tensor, or dicts / lists
    / objects with a `cond` tensor holding them), in the order given. Each module's output gets a zero probe vector
    added (the values are unchanged) and one backward asks which probes the result depends on: a module that never
    runs (Qwen2.5-VL's vision tower for a text prompt) or whose output is dropped (the layers after the one a host
    reads, e.g. Lumina 2's last Gemma layer) gets no gradient. A vector, not a scalar: a norm right after a module
    would cancel a uniform shift and hide a real path. Runs under grad mode with `root`'s norms reading copies
    (inplace_safe), so in-place residual adds stay legal."""
    modules = dict(root.named_modules())
    probes: dict[str, torch.Tensor] = {}

    def hook_for(path):
        def hook(module, args, output):
            if not torch.is_tensor(output) or not output.is_floating_point():
                return None
            if path not in probes:
                probes[path] = torch.zeros(output.shape[-1], dtype=output.dtype, device=output.device,
                                           requires_grad=True)
            return output + probes[path]
        return hook

    handles = [modules[p].register_forward_hook(hook_for(p)) for p in paths]
    try:
        with torch.inference_mode(False), torch.enable_grad(), inplace_safe(root):
            outputs = [t for t in _tensors(run()) if t.requires_grad]
        if not outputs or not probes:
            return []
        gen = torch.Generator().manual_seed(0)
        total = sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum() for t in outputs)
        names = list(probes)
        grads = torch.autograd.grad(total, [probes[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    reached = {n for n, g in zip(names, grads) if g is not None}
    return [p for p in paths if p in reached]


def _tensors(value):
    """The tensors inside a conditioning: a tensor, a dict / list / tuple of them, or objects with a `cond` tensor
    (ComfyUI's CONDRegular) or `rows` (a host's per-row conditionings)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    else:
        for attr in ("cond", "rows"):
            if hasattr(value, attr):
                yield from _tensors(getattr(value, attr))

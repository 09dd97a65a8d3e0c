"""Autograd helpers shared by the training stages (saliency scan, distill): freezing a network and gradient
checkpointing its blocks."""
from __future__ import annotations

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


@contextmanager
def gradient_checkpointing(network: torch.nn.Module):
    """Recompute each block's activations during backward instead of storing them (student passes only; teacher
    passes run without grad and are unaffected). Blocks = the elements of the network's top-level ModuleLists /
    Sequentials (UNet input/middle/output blocks, DiT double/single blocks). The blocks' `forward` is swapped on the
    instance (ComfyUI's trainer does the same) and restored on exit; modules are not restructured."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    for child in network.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for block in child:
                had_own = "forward" in block.__dict__
                original = block.forward

                def forward(*args, _f=original, **kwargs):
                    if torch.is_grad_enabled():
                        return checkpoint(_f, *args, use_reentrant=False, **kwargs)
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

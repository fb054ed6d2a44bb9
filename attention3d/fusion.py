"""Inference-time folding of batch norms into the convolution before them.

In eval mode a batch norm is a fixed per-channel affine map, so `norm(conv(x))` is one convolution with scaled
weights and a shifted bias (torch.nn.utils.fusion.fuse_conv_bn_eval). Folding removes a full pass over every
feature map (what it saves: docs/benchmarks.md, "design measurements"). Instance and group norms depend on the
input and stay as they are.
"""

from __future__ import annotations

import itertools

from monai.networks.blocks.dynunet_block import UnetBasicBlock
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        type(conv) in _CONVS
        and isinstance(norm, _BatchNorm)
        and not conv.training
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
        and conv.out_channels == norm.num_features
    )


def fold_batch_norms(model: nn.Module) -> int:
    """Folds, in place, every eval-mode batch norm that directly follows a convolution: the norm of each conv in a
    MONAI `UnetBasicBlock` (conv, [dropout], norm, act: dropout is the identity in eval) and each (conv, norm)
    pair of adjacent children of an `nn.Sequential`. The folded norm becomes `nn.Identity`, so the state dict
    changes: fold a copy, not a model that is saved or trained further. Returns the number of norms folded."""
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode (a training batch norm uses batch statistics)")
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, UnetBasicBlock):
            for conv_name, norm_name in (("conv1", "norm1"), ("conv2", "norm2")):
                wrapper, norm = getattr(module, conv_name), getattr(module, norm_name)
                conv = getattr(wrapper, "conv", wrapper)
                if _foldable(conv, norm):
                    fused = fuse_conv_bn_eval(conv, norm)
                    if conv is wrapper:
                        setattr(module, conv_name, fused)
                    else:
                        wrapper.conv = fused
                    setattr(module, norm_name, nn.Identity())
                    folded += 1
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                conv, norm = module._modules[first], module._modules[second]
                if conv is not None and norm is not None and _foldable(conv, norm):
                    module._modules[first] = fuse_conv_bn_eval(conv, norm)
                    module._modules[second] = nn.Identity()
                    folded += 1
    return folded

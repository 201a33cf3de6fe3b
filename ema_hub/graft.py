"""``add_ema``: graft EMA into a model that is already built (usually pretrained) without changing its function.

Every grafted layer starts as x -> x/2 (``pretrained.half_state``: gn and conv3x3 zero, so both softmaxes are
uniform and every gate is sigmoid(0)), and the factor 2 is compensated exactly:

* ``after=None``, a timm model of a supported family: EMA goes where the family's variant has it (the registry's
  ``FAMILIES``) and the 2 folds into the linear layer next to it, as the warm start does, so the result is the
  named variant's warm start (``pretrained.warm_start_state_dict`` of the model's own weights).
* ``after=[names]``, any module: EMA runs on each named submodule's output through a forward hook that returns
  2 * EMA(output). The layer after it may be anything (a ReLU, a concatenation), so the 2 stays in the hook,
  exactly and for good: the grafted layer computes 2 * EMA, whose gates range over (0, 2). The submodule keeps
  its object, its attributes (ultralytics reads ``.f`` and ``.i``) and its state dict keys; EMA's are added
  under ``<name>.ema`` (for an nn.Sequential, which runs every child it holds, under its last layer's name),
  so a grafted model's state dict loads into a freshly grafted copy.
"""
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import UsageError
from .layers import EMA
from .pretrained import half_state, warm_start_state_dict
from .registry import EMA_FACTOR

__all__ = ['add_ema', 'graft_family', 'grafted_layers', 'ChannelsLastEMA']

_HOOK_SCALE = 2.0  # compensates EMA's x/2 start after a submodule whose successor is unknown


def add_ema(model: nn.Module, after: Optional[Sequence[str]] = None, factor: int = EMA_FACTOR,
            input_size: Optional[Tuple[int, int, int]] = None) -> nn.Module:
    """Graft EMA into ``model`` in place, keeping its function exactly; returns ``model``.

    ``after=None``: ``model`` is a timm model of a supported family (ResNet and its D, wide and ResNeXt forms;
    MobileNetV2, EfficientNet and MobileNetV3, built by timm's EfficientNet builder; ConvNeXt): EMA in every
    block at the family's placement (``graft_family``). ``after=['backbone.6', ...]``: any module, EMA after
    each named submodule; its channel count comes from one dry run on zeros of ``input_size`` (C, H, W;
    default the model's ``pretrained_cfg`` input size, else 3 x 64 x 64), in eval mode, with no gradient.
    """
    if after is None:
        base = model.state_dict()
        family = graft_family(model, factor)
        model.load_state_dict(warm_start_state_dict(base, model, family))
        return model
    names = [after] if isinstance(after, str) else list(after)
    modules = [_submodule(model, name) for name in names]
    for name, module, channels in zip(names, modules, _output_channels(model, names, modules, input_size)):
        host = _host(module)
        if hasattr(host, 'ema'):
            raise UsageError(f'{name} already has an attribute named ema; EMA is already grafted there')
        host.ema = _new_ema(channels, factor, module)
        host.ema.load_state_dict(half_state(host.ema))
        host.register_forward_hook(_ema_after)
    return model


def graft_family(model: nn.Module, factor: int = EMA_FACTOR) -> str:
    """EMA (freshly initialised) into every block of ``model`` at its family's placement, in the block's attention
    slot ``se``; returns the family (a key of ``FAMILIES``). The variants' builders use this; ``add_ema`` then
    maps the model's own weights through the warm start.

    ResNet: every residual block, after its last BatchNorm. timm's EfficientNet builder: the rule of the paper's
    timm fork, EMA after SE (where the block has one) and before the pointwise projection, in an inverted
    residual whose expanded width exceeds 144 and a depthwise-separable block whose width exceeds 320.
    ConvNeXt: every block, after the MLP and before the layer scale (``ChannelsLastEMA`` in the MLP's last slot).
    """
    blocks = list(_family_blocks(model))
    if not blocks:
        raise UsageError(f'{type(model).__name__} has no block add_ema knows (ResNet, EfficientNet-builder blocks); '
                         f'name the layers to add EMA after with after=[...]')
    for family, block, channels in blocks:
        if channels is None:
            continue  # a block the placement rule leaves out
        if family == 'resnet' and block.se is not None:
            raise UsageError(f'{type(block).__name__} already has an attention layer (se); name the layers to '
                             f'add EMA after with after=[...]')
        ema = _new_ema(channels, factor, block)
        if family == 'convnext':  # after the MLP, in its last slot (its dropout), before the layer scale
            block.mlp.drop2 = ChannelsLastEMA(ema, block.mlp.drop2)
        else:  # timm's attention slot; after an existing squeeze-excitation in EfficientNet-builder blocks
            block.se = ema if block.se is None or isinstance(block.se, nn.Identity) else nn.Sequential(block.se, ema)
    return blocks[0][0]


class ChannelsLastEMA(nn.Module):
    """EMA on a channels-last map (N, H, W, C), as ConvNeXt's MLP makes it, then the layer whose slot it took.

    The permutes are views: EMA reads and writes the channels_last layout in place."""

    def __init__(self, ema: EMA, then: nn.Module):
        super().__init__()
        self.ema = ema
        self.then = then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self.ema(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def grafted_layers(model: nn.Module) -> List[str]:
    """Names of the submodules whose output goes through a grafted EMA (``after=``), as they hold it."""
    return [name for name, m in model.named_modules() if isinstance(getattr(m, 'ema', None), EMA)
            and _ema_after in m._forward_hooks.values()]


def _host(module: nn.Module) -> nn.Module:
    """The module that holds the grafted EMA and its hook: ``module``, or for an nn.Sequential (which would run
    any child it is given) its last layer, whose output is the Sequential's."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module


def _ema_after(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.ema(output) * _HOOK_SCALE


def _new_ema(channels: int, factor: int, near: nn.Module) -> EMA:
    """A new EMA on the device and in the dtype of the module it joins."""
    ref = next(near.parameters(), None)
    return EMA(channels, factor, device=ref.device if ref is not None else None,
               dtype=ref.dtype if ref is not None else None)


# The paper's timm fork adds EMA to an EfficientNet-builder block only above these widths.
_MIN_INVERTED_RESIDUAL = 144   # InvertedResidual: mid_chs > 144
_MIN_DEPTHWISE_SEPARABLE = 320  # DepthwiseSeparableConv: in_chs > 320


def _family_blocks(model: nn.Module) -> Iterable[Tuple[str, nn.Module, Optional[int]]]:
    """(family, block, the channels EMA gets there or None where the placement leaves the block out)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck

    for module in model.modules():
        if isinstance(module, ConvNeXtBlock):
            if module.use_conv_mlp or module.gamma is None:
                raise UsageError('add_ema knows ConvNeXt blocks with a linear MLP and a layer scale (the '
                                 'convnext_* models); name the layers to add EMA after with after=[...]')
            yield 'convnext', module, module.conv_dw.out_channels
        if isinstance(module, (Bottleneck, BasicBlock)):  # EMA's input: bn3 in bottlenecks, bn2 in basic blocks
            yield 'resnet', module, (module.bn3 if hasattr(module, 'bn3') else module.bn2).num_features
        elif isinstance(module, InvertedResidual):
            mid = module.conv_pwl.in_channels
            yield 'efficientnet', module, mid if mid > _MIN_INVERTED_RESIDUAL else None
        elif isinstance(module, DepthwiseSeparableConv):
            width = module.conv_pw.in_channels
            yield 'efficientnet', module, width if width > _MIN_DEPTHWISE_SEPARABLE else None


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ', '.join(n for n, _ in model.named_children()) or 'none'
        raise UsageError(f'{name!r} is not a submodule of {type(model).__name__}; name one of its modules '
                         f'(top level: {children})') from None


def _output_channels(model: nn.Module, names: List[str], modules: List[nn.Module],
                     input_size: Optional[Tuple[int, int, int]]) -> List[int]:
    """Each named submodule's output channels, from one dry run of the model."""
    size = tuple(input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3, 64, 64))
    outputs = {}
    handles = [m.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out)) for i, m in enumerate(modules)]
    ref = next(model.parameters(), None)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *size), device=ref.device if ref is not None else None,
                              dtype=ref.dtype if ref is not None else None))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    channels = []
    for i, name in enumerate(names):
        out = outputs.get(i)
        if out is None:
            raise UsageError(f'{name} did not run in a forward pass of the model; name a layer the forward uses')
        if not torch.is_tensor(out) or out.dim() != 4:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UsageError(f'{name} outputs {shape}, not a 4-D feature map (N, C, H, W); EMA goes after a '
                             f'convolutional layer or block')
        if out.shape[1] == 0:
            raise UsageError(f'{name} outputs 0 channels; EMA needs at least one')
        channels.append(out.shape[1])
    return channels

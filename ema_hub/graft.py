"""``add_ema``: graft EMA into a model that is already built (usually pretrained) without changing its function.

Every grafted layer starts as x -> x/2 (``pretrained.half_state``: gn and conv3x3 zero, so both softmaxes are
uniform and every gate is sigmoid(0)), and the factor 2 is compensated exactly:

* ``after=None``, a timm model of a supported family: EMA goes where the family's variant has it
  (``placement.FAMILIES``) and the 2 folds into the linear layer next to it, as the warm start does, so the result is the
  named variant's warm start (``pretrained.warm_start_state_dict`` of the model's own weights).
* ``after=[names]``, any module: EMA runs on each named submodule's output through a forward hook that returns
  2 * EMA(output). The layer after it may be anything (a ReLU, a concatenation), so the 2 stays in the hook,
  exactly and for good: the grafted layer computes 2 * EMA, whose gates range over (0, 2). The submodule keeps
  its object, its attributes (ultralytics reads ``.f`` and ``.i``) and its state dict keys; EMA's are added
  under ``<name>.ema`` (for an nn.Sequential, which runs every child it holds, under its last layer's name),
  so a grafted model's state dict loads into a freshly grafted copy.
"""
from operator import attrgetter
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import UsageError
from .layers import EMA
from .placement import ATTENTION_SLOT, Site, find_sites, join_attention
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
        graft_family(model, factor)
        model.load_state_dict(warm_start_state_dict(base, model))
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
    """EMA (freshly initialised) into every block of ``model`` at its family's sites (``placement.FAMILIES``);
    returns the family. The variants' builders use this; ``add_ema`` then maps the model's own weights through the
    warm start."""
    sites = list(find_sites(model))
    if not sites:
        raise UsageError(f'{type(model).__name__} has no block add_ema knows (ResNet, EfficientNet-builder and '
                         f'ConvNeXt blocks); name the layers to add EMA after with after=[...]')
    for _, block, _, site in sites:
        channels = site.channels(block)
        if channels is None:
            continue  # a block the placement leaves out
        _check_site(block, site)
        ema = _new_ema(channels, factor, block)
        holder, slot = _parent(block, site.slot)
        current = getattr(holder, slot)
        if site.channels_last:
            setattr(holder, slot, ChannelsLastEMA(ema, current))
        else:
            setattr(holder, slot, join_attention(current, ema))
    return sites[0][2]


def _check_site(block: nn.Module, site: Site) -> None:
    """A UsageError where ``block`` is a form its site does not fit, or lacks what the site needs: the slot, the
    layer the warm start folds into, a free attention slot where the site does not join an SE."""
    def get(path):
        try:
            return attrgetter(path)(block)
        except AttributeError:
            return None
    kind = type(block).__name__
    if site.unfit_if and getattr(block, site.unfit_if):
        raise UsageError(f'this {kind} has {site.unfit_if} set, a form EMA\'s placement does not fit; name the layers '
                         f'to add EMA after with after=[...]')
    holder, slot = _parent(block, site.slot)
    if not hasattr(holder, slot) or get(site.fold_into) is None:
        missing = site.slot if not hasattr(holder, slot) else site.fold_into
        raise UsageError(f'this {kind} has no {missing}, which EMA\'s placement there needs; name the layers to add '
                         f'EMA after with after=[...]')
    taken = not isinstance(get(site.slot), (type(None), nn.Identity))
    if site.slot == ATTENTION_SLOT and taken and not site.joins_attention:
        raise UsageError(f'{kind} already has an attention layer ({site.slot}); name the layers to add EMA after '
                         f'with after=[...]')


def _parent(block: nn.Module, path: str) -> Tuple[nn.Module, str]:
    """The module holding the attribute ``path`` of ``block``, and the attribute's own name."""
    head, _, slot = path.rpartition('.')
    return (attrgetter(head)(block) if head else block), slot


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

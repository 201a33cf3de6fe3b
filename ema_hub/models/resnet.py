"""ResNet and ResNeXt with EMA in every residual block.

EMA is timm's own channel attention slot's layer (``block_args=dict(attn_layer=EMA)``), which is the family's
placement (``ema_hub.placement.FAMILIES['resnet']``). Architecture arguments come from ``ema_hub.registry.VARIANTS``.
"""
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers import EMA
from ..pretrained import checkpoint_filter_fn, loads_weights, pretrained_cfgs, without_foreign_labels
from ..registry import VARIANTS

_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def _create_resnet_ema(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    arch = dict(VARIANTS[variant].arch)
    model_args = dict(arch, block=_BLOCKS[arch['block']], block_args=dict(attn_layer=EMA))
    pretrained = loads_weights(pretrained, kwargs.get('pretrained_cfg'))
    return without_foreign_labels(build_model_with_cfg(
        ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(model_args, **kwargs)))


default_cfgs = generate_default_cfgs(pretrained_cfgs('resnet'))


@register_model
def resnet18_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with EMA in every basic block."""
    return _create_resnet_ema('resnet18_ema', pretrained, **kwargs)


@register_model
def resnet34_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-34 with EMA in every basic block."""
    return _create_resnet_ema('resnet34_ema', pretrained, **kwargs)


@register_model
def resnet50_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with EMA in every bottleneck."""
    return _create_resnet_ema('resnet50_ema', pretrained, **kwargs)


@register_model
def resnet101_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101 with EMA in every bottleneck."""
    return _create_resnet_ema('resnet101_ema', pretrained, **kwargs)


@register_model
def resnet152_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-152 with EMA in every bottleneck."""
    return _create_resnet_ema('resnet152_ema', pretrained, **kwargs)


@register_model
def resnext50_32x4d_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNeXt-50 32x4d with EMA in every bottleneck."""
    return _create_resnet_ema('resnext50_32x4d_ema', pretrained, **kwargs)


@register_model
def resnet50d_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50-D (deep stem, average-pool downsampling) with EMA in every bottleneck."""
    return _create_resnet_ema('resnet50d_ema', pretrained, **kwargs)


@register_model
def resnet101d_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101-D (deep stem, average-pool downsampling) with EMA in every bottleneck."""
    return _create_resnet_ema('resnet101d_ema', pretrained, **kwargs)


@register_model
def wide_resnet50_2_ema(pretrained: bool = False, **kwargs) -> ResNet:
    """Wide ResNet-50-2 (bottlenecks twice as wide) with EMA in every bottleneck."""
    return _create_resnet_ema('wide_resnet50_2_ema', pretrained, **kwargs)

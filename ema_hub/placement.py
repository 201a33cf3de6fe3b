"""Where EMA sits in each architecture family: the one table (``FAMILIES``) that the graft, the warm start, checkpoint
conversion and the model cards all read, and the attention-slot rule they share.

A family is a list of ``Site``s, one per kind of timm block: which channels EMA gets there, which slot of the block
it takes and which layer next to it absorbs the warm start's factor 2. EMA in timm's attention slot ``se`` joins a
squeeze-excitation the block already has: the slot becomes ``nn.Sequential(se, ema)``, so the SE's keys move from
``se.*`` to ``se.0.*`` and EMA's are ``se.1.*`` (``join_attention`` builds it; ``move_attention_keys`` maps a
checkpoint of the block without EMA to it).
"""
import importlib
from dataclasses import dataclass
from operator import attrgetter
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .layers import EMA

__all__ = ['Site', 'Family', 'FAMILIES', 'EmaSite', 'find_sites', 'ema_sites', 'join_attention',
           'move_attention_keys', 'ATTENTION_SLOT']

ATTENTION_SLOT = 'se'  # timm's name for a block's channel-attention slot (attn_layer, se_layer)


@dataclass(frozen=True)
class Site:
    """EMA's place in one kind of timm block."""
    block: str                    # the block's class, 'module:Class'
    width: str                    # attribute path of the channel count EMA gets there
    slot: str                     # attribute path of the slot EMA takes
    fold_into: str                # the layer (weight, bias) or parameter next to EMA the warm start scales by 2
    min_width: int = 0            # EMA only where the width exceeds this (narrow blocks are left out)
    joins_attention: bool = False  # behind the block's own SE (se.0, EMA at se.1); else a block with one is refused
    channels_last: bool = False   # the slot sees (N, H, W, C) maps: EMA is wrapped in ``graft.ChannelsLastEMA``
    unfit_if: str = ''            # a block attribute that, when true, marks a form of the block the site does not fit

    @property
    def block_class(self) -> type:
        module, name = self.block.split(':')
        return getattr(importlib.import_module(module), name)

    def channels(self, block: nn.Module) -> Optional[int]:
        """The channels EMA gets in ``block``, or None where this site leaves the block out."""
        width = int(attrgetter(self.width)(block))
        return width if width > self.min_width else None


@dataclass(frozen=True)
class Family:
    """An architecture family's sites, and the same placement in words for docstrings and cards."""
    sites: Tuple[Site, ...]
    placement: str    # in words: cards, the placement tests
    fold_words: str   # the warm start's fold, in words for the cards
    block_words: str  # which blocks have EMA, for a card's first line


FAMILIES: Dict[str, Family] = {
    'resnet': Family(
        sites=(Site('timm.models.resnet:Bottleneck', 'bn3.num_features', ATTENTION_SLOT, 'bn3'),
               Site('timm.models.resnet:BasicBlock', 'bn2.num_features', ATTENTION_SLOT, 'bn2')),
        placement='after the last BatchNorm of every residual block (bn2 in basic blocks, bn3 in bottlenecks), '
                  'before the residual add: where timm places channel attention',
        fold_words='the BatchNorm before it (`bn3` in bottlenecks, `bn2` in basic blocks, weight and bias)',
        block_words='every residual block',
    ),
    'efficientnet': Family(  # the paper's own timm fork: only blocks above these widths
        sites=(Site('timm.models._efficientnet_blocks:InvertedResidual', 'conv_pwl.in_channels', ATTENTION_SLOT,
                    'conv_pwl', min_width=144, joins_attention=True),
               Site('timm.models._efficientnet_blocks:DepthwiseSeparableConv', 'conv_pw.in_channels', ATTENTION_SLOT,
                    'conv_pw', min_width=320, joins_attention=True)),
        placement='after squeeze-excitation (or the depthwise convolution, in blocks without it) and before the '
                  'pointwise projection, in every inverted residual whose expanded width exceeds 144 and every '
                  'depthwise-separable block whose width exceeds 320: the rule of the paper\'s own timm fork',
        fold_words='the pointwise projection after it (`conv_pwl` in inverted residuals, `conv_pw` in '
                   'depthwise-separable blocks, weight)',
        block_words='its wider blocks, as the paper places it',
    ),
    'convnext': Family(  # the MLP's last slot (its dropout), before the layer scale
        sites=(Site('timm.models.convnext:ConvNeXtBlock', 'conv_dw.out_channels', 'mlp.drop2', 'gamma',
                    channels_last=True, unfit_if='use_conv_mlp'),),  # a convolutional MLP keeps maps NCHW
        placement='in every block, after the MLP and before the layer scale and the residual add',
        fold_words='the layer scale after it (`gamma`)',
        block_words='every block',
    ),
}


def find_sites(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, Site]]:
    """(block name, block, family, site) for every block of ``model`` that a family has a site in."""
    kinds = [(family, site, site.block_class) for family, f in FAMILIES.items() for site in f.sites]
    for name, module in model.named_modules():
        for family, site, cls in kinds:
            if isinstance(module, cls):
                yield name, module, family, site
                break


@dataclass(frozen=True)
class EmaSite:
    """An EMA layer placed at a family's site: its name, its block's and the site."""
    name: str
    block: str
    site: Site

    @property
    def joined_attention(self) -> bool:
        """Whether it sits behind the block's own SE (``se.1``, the SE at ``se.0``)."""
        return self.name == f'{self.block}.{ATTENTION_SLOT}.1'

    def fold_keys(self, state: Dict[str, torch.Tensor]) -> Tuple[str, ...]:
        """The keys of ``state`` the warm start's factor 2 multiplies: the site's layer (weight and bias) or
        parameter (ConvNeXt's layer scale)."""
        layer = f'{self.block}.{self.site.fold_into}' if self.block else self.site.fold_into
        keys = tuple(k for k in (f'{layer}.weight', f'{layer}.bias', layer) if k in state)
        if not keys:
            raise KeyError(f'no {layer} next to {self.name} in the checkpoint')
        return keys


def ema_sites(model: nn.Module) -> Iterator[EmaSite]:
    """Every EMA layer of ``model`` that sits at a family's site, with that site."""
    for block_name, block, _, site in find_sites(model):
        prefix = f'{block_name}.' if block_name else ''
        for name, module in block.named_modules():
            if isinstance(module, EMA):
                yield EmaSite(prefix + name, block_name, site)


def join_attention(attention: Optional[nn.Module], ema: nn.Module) -> nn.Module:
    """What a block's attention slot holds with EMA in it: EMA, or ``nn.Sequential(se, ema)`` behind its own SE."""
    return ema if attention is None or isinstance(attention, nn.Identity) else nn.Sequential(attention, ema)


def move_attention_keys(state: Dict[str, torch.Tensor], block: str) -> None:
    """Move ``block``'s SE keys (``se.*``) under ``se.0``, where ``join_attention`` puts the SE; in place, and a
    key already at ``se.0``/``se.1`` stays."""
    slot = f'{block}.{ATTENTION_SLOT}.' if block else f'{ATTENTION_SLOT}.'
    for key in [k for k in state if k.startswith(slot) and not k[len(slot):].startswith(('0.', '1.'))]:
        state[f'{slot}0.{key[len(slot):]}'] = state.pop(key)

"""ema-hub: timm backbones with EMA, the Efficient Multi-Scale Attention of Ouyang et al. (arXiv 2305.13563).

Importing this package registers the variants with timm, so that ``timm.create_model('resnet50_ema')``
works like any timm model.
"""
from . import models as _models  # noqa: F401  (registers the variants with timm)
from .graft import add_ema
from .layers import EMA, ema_groups
from .registry import VARIANTS, Variant, get_variant

__version__ = '0.1.0'
__all__ = ['EMA', 'add_ema', 'ema_groups', 'VARIANTS', 'Variant', 'get_variant']

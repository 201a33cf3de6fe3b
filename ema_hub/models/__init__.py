"""EMA variants registered with timm: importing this package makes them available to ``timm.create_model``."""
from . import convnext, efficientnet, grafted, resnet

from .ema import EMA, ema_groups, implementation

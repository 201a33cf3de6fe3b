"""ema-hub's command line (installed as ``ema_hub_cli``): ``ema-classify`` and ``ema-hub``.

Importing this package is cheap: torch, timm and ema_hub are imported inside the commands, so ``--help``
answers at once.
"""

"""ema-hub's benchmarks (installed as ``ema_hub_benchmarks``): each prints ratios measured side by side in one run.

* ``speed``: the EMA layer against the paper's form, and the networks against resnet50 (``ema-hub benchmark``).
* ``classify``: ``ema-classify DIR`` against the straightforward batched timm recipe
  (``python -m ema_hub_benchmarks.classify``).
"""

"""The test oracle lives in ema_hub/reference.py (shared with the benchmark); re-exported here for the tests."""
from ema_hub.reference import ReferenceEMA  # noqa: F401

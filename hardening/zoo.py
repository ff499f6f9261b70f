"""Known PyTorch architectures (defined in ``attacks.architectures``, which the extraction
thieves build from; re-exported here for the release-time pipeline and model loading)."""

from __future__ import annotations

from attacks.architectures import ARCHITECTURES, WIDTH_KWARGS, DigitsCNN, LogitsOnly, TabularMLP

__all__ = ["ARCHITECTURES", "WIDTH_KWARGS", "DigitsCNN", "LogitsOnly", "TabularMLP"]

"""One exception root for the device: every error runtime_guard raises on purpose is a GuardError."""

from __future__ import annotations

import numpy as np
import pytest

from runtime_guard import errors
from runtime_guard.anomaly import AnomalyFormatError, AnomalyInputError
from runtime_guard.config import GuardConfig, GuardConfigError
from runtime_guard.deadline import DeadlineExceeded
from runtime_guard.golden import GoldenSetError
from runtime_guard.ratelimit import StorageUnavailable
from runtime_guard.sanitizer import SanitizerError

LOAD = [errors.FormatError, errors.SignatureError, errors.TamperError, errors.BundleKeyError,
        errors.ExpiredError, errors.RollbackError, errors.ModelRejected, DeadlineExceeded,
        GuardConfigError, AnomalyFormatError, GoldenSetError, errors.PartsMismatch]
REQUEST = [SanitizerError, AnomalyInputError, errors.InvalidClientId, StorageUnavailable]


@pytest.mark.parametrize("cls", LOAD)
def test_load_time_errors_are_load_errors(cls):
    assert issubclass(cls, errors.LoadError) and not issubclass(cls, errors.RequestError)
    assert isinstance(cls.check, str) and cls.check not in ("guard", "load")


@pytest.mark.parametrize("cls", REQUEST)
def test_request_time_errors_are_request_errors(cls):
    assert issubclass(cls, errors.RequestError) and not issubclass(cls, errors.LoadError)


def test_every_raised_error_carries_a_check():
    assert GuardConfigError("rate_limit.per_client", "bad").check == "config"
    assert SanitizerError("shape", "bad").check == "shape"
    assert StorageUnavailable("ConnectionError", 1.0).check == "rate-limit-storage"
    with pytest.raises(GuardConfigError) as info:
        GuardConfig.from_dict({"output": {"policy": "nope"}})
    assert isinstance(info.value, errors.GuardError)


def test_guard_refusals_are_guard_errors_not_bare_value_errors(digits_demo):
    from pathlib import Path

    from runtime_guard.config import AnomalyGateConfig, ExtractionMonitorConfig, RateLimitConfig
    from runtime_guard.guard import GuardedModel

    model = Path(digits_demo.model_path).read_bytes()
    with pytest.raises(errors.PartsMismatch, match="AnomalyScorer"):
        GuardedModel(model, GuardConfig(anomaly=AnomalyGateConfig(action="reject")))
    g = GuardedModel(model, GuardConfig(rate_limit=RateLimitConfig(per_client=None),
                                        extraction=ExtractionMonitorConfig(enabled=False)))
    with pytest.raises(errors.InvalidClientId):
        g.predict(np.zeros((1, 1, 8, 8), np.float32), "")

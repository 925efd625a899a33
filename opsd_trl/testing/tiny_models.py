"""The tiny in-code models for tests and benchmarks: the `tiny:` builders of `opsd_trl.models.tiny`, under the name
the tests import."""

from ..models.tiny import *  # noqa: F403
from ..models.tiny import __all__  # noqa: F401

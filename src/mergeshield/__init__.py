"""mergeshield: protect transformer checkpoints against unauthorized model merging.

Python API::

    import mergeshield
    mergeshield.protect("my-model", "my-model-protected", "all", key_out="my-model.key")
    report = mergeshield.verify("my-model", "my-model-protected")
    assert report.ok
"""

__version__ = "0.1.0"

from mergeshield.detect import detect  # noqa: E402
from mergeshield.errors import MergeShieldError  # noqa: E402
from mergeshield.protect import protect, unprotect  # noqa: E402
from mergeshield.verify import verify  # noqa: E402

__all__ = ["MergeShieldError", "__version__", "detect", "protect", "unprotect", "verify"]

"""mergeshield: protect transformer checkpoints against unauthorized model merging.

Python API::

    import mergeshield
    mergeshield.protect("my-model", "my-model-protected", "all", key_out="my-model.key")
    report = mergeshield.verify("my-model", "my-model-protected")
    assert report.ok
"""

from mergeshield.detect import detect
from mergeshield.errors import MergeShieldError
from mergeshield.protect import protect, unprotect
from mergeshield.verify import verify
from mergeshield.version import __version__

__all__ = ["MergeShieldError", "__version__", "detect", "protect", "unprotect", "verify"]

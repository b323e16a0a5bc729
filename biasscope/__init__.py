"""biasscope: is this vision model right for the right reasons?

``biasscope.scan(model, data, **options)`` runs batched Grad-CAM over a labelled validation set
and stores predictions, heatmaps and attention-vs-mask metrics; ``biasscope.load(scan_dir)``
reads a stored scan back without TensorFlow.
"""

__version__ = "0.1.0"

from .errors import BiasscopeError  # noqa: E402
from .store import Scan, load  # noqa: E402
# bound after the submodule is imported, so ``biasscope.compare`` is the function
from .compare import Comparison, compare  # noqa: E402


def scan(model, data, **options):
    """Run a scan; see :func:`biasscope.api.scan` (imported lazily: it needs TensorFlow)."""
    from .api import scan as _scan

    return _scan(model, data, **options)


__all__ = ["scan", "load", "compare", "Comparison", "Scan", "BiasscopeError", "__version__"]

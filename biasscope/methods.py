"""The CAM methods by name, without TensorFlow (the CLI and option checks use this; the
implementations are in :mod:`biasscope.cams`)."""

from __future__ import annotations

from .errors import BiasscopeError

METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM",
                 "hirescam": "HiResCAM", "layercam": "LayerCAM", "eigencam": "Eigen-CAM",
                 "scorecam": "Score-CAM"}
METHOD_NAMES = tuple(METHOD_LABELS)


def check_method(method: str, scorecam_channels: int = 32) -> dict:
    """The method's own options for :func:`biasscope.cams.make_cam`; a one-line error for an
    unknown method or a bad option."""
    if method not in METHOD_NAMES:
        raise BiasscopeError(f"--method {method!r}: available methods are {', '.join(METHOD_NAMES)}")
    if method == "scorecam":
        if int(scorecam_channels) < 1:
            raise BiasscopeError(f"--scorecam-channels must be >= 1, got {scorecam_channels}")
        return {"scorecam_channels": int(scorecam_channels)}
    return {}

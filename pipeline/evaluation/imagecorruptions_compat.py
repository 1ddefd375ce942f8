"""imagecorruptions (COCO-C) as it runs today: its last release, 1.1.2, predates NumPy 2 and the
scikit-image that dropped `multichannel`, so its `corruptions` module is handed both as it expects
them. The one place that patches a third-party module; tests/test_robustness.py checks that each
adaptation is still needed, and that the corruptions run with it.
"""
import functools
import types
import warnings

import numpy as np


class _NumPyWithFloat_(types.ModuleType):
    """NumPy as imagecorruptions 1.1.2 expects it: with `np.float_`, which NumPy 2 removed."""

    float_ = np.float64

    def __getattr__(self, name: str):
        return getattr(np, name)


def _gaussian_with_multichannel(image, *args, multichannel: bool = False, **kwargs):
    """skimage.filters.gaussian as imagecorruptions 1.1.2 calls it: scikit-image 0.19 renamed
    `multichannel=True` to `channel_axis=-1` and later versions dropped the old name."""
    from skimage.filters import gaussian

    return gaussian(image, *args, channel_axis=-1 if multichannel else None, **kwargs)


@functools.cache
def adapted_imagecorruptions() -> types.ModuleType:
    """The imagecorruptions package, its module adapted to current NumPy and scikit-image (the
    last release, 1.1.2, predates both). Only that module sees the adaptations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its pkg_resources and scipy.ndimage.interpolation imports
        import imagecorruptions
        from imagecorruptions import corruptions
    corruptions.np = _NumPyWithFloat_("numpy")
    corruptions.gaussian = _gaussian_with_multichannel
    return imagecorruptions

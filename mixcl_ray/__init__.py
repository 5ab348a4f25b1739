"""mixcl_ray: MixCL pre-training and label-efficiency studies for 3D segmentation on Ray.

Layout follows the data flow: ``data`` (patches, views, corruptions) -> ``models`` and
``losses`` (pure PyTorch/MONAI) -> training stages -> sweeps -> tracking.
"""

__version__ = "0.1.0"

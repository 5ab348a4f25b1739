"""MONAI without the optional packages it loads for features mixcl_ray never calls.

``import monai`` imports every MONAI submodule, and MONAI's ``optional_import`` imports an
optional package at once when it is installed: mlflow (MONAI's MLflow handler), matplotlib (its
plots), pandas (its CSV datasets), scikit-learn (an embedding metric, pulling in pandas and
scipy.stats) and scipy.signal (two transforms). On one core of a 2-core machine that was 3.9 of
MONAI's 5.7 s, and every fit starts worker processes that import MONAI, two at once
(``benchmarks/fit_cost.py`` counts it in the fit's start).

``hide_from_monai()`` installs an import finder that refuses those packages to MONAI's own code
while MONAI loads, so MONAI records them as not installed; any other import of them, then or
later, finds them as usual. Ray worker processes of a mixcl_ray job install it at start
(``mixcl_ray.ray_start.setup_worker``); a driver, a notebook or a user's script does not.
"""

from __future__ import annotations

import sys

HIDDEN = ("mlflow", "matplotlib", "pandas", "scipy.signal", "scipy.stats", "sklearn")


def _loading_monai() -> bool:
    """True while MONAI's package is being executed (``import monai`` under way)."""
    monai = sys.modules.get("monai")
    spec = getattr(monai, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _asked_by_monai() -> bool:
    """True when the import statement running now is in one of MONAI's modules."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "monai" or name.startswith("monai."):
            return True
        if not name.startswith(("importlib", "_frozen_importlib")):
            return False  # the importing frame is someone else's
        frame = frame.f_back
    return False


class HideFromMonai:
    """A ``sys.meta_path`` finder: ``HIDDEN`` packages not yet imported are not found by MONAI's
    modules while MONAI loads; it finds nothing itself, so every other import goes on."""

    def find_spec(self, name, path=None, target=None):
        for hidden in HIDDEN:
            if (name == hidden or name.startswith(hidden + ".")) and hidden not in sys.modules:
                if _loading_monai() and _asked_by_monai():
                    raise ModuleNotFoundError(
                        f"{name} is not loaded for MONAI in mixcl_ray's workers "
                        "(mixcl_ray.lean_monai)",
                        name=name,
                    )
        return None


def hide_from_monai() -> None:
    """Install ``HideFromMonai`` once in this process (first on ``sys.meta_path``)."""
    if not any(isinstance(f, HideFromMonai) for f in sys.meta_path):
        sys.meta_path.insert(0, HideFromMonai())

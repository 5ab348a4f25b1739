"""MONAI in mixcl_ray's Ray workers loads without the optional packages it would import for
nothing (mixcl_ray.lean_monai), and everything mixcl_ray uses of MONAI still works."""

import json
import subprocess
import sys

from mixcl_ray.lean_monai import HIDDEN

# a fresh interpreter: this one may have MONAI and the hidden packages loaded already
SCRIPT = """
import json, sys
import scipy.signal  # imported before MONAI by someone else: MONAI gets it as well
from mixcl_ray.lean_monai import HIDDEN, hide_from_monai
hide_from_monai()
hide_from_monai()  # installed once
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
import monai.transforms.signal.array as signal
loaded_with_monai = [m for m in HIDDEN if m in sys.modules]
net = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4))
x = torch.rand(1, 1, 32, 32, 32)
y = sliding_window_inference(x, (32, 32, 32), 1, net)
loss = DiceCELoss(to_onehot_y=True, softmax=True)(y, (x > 0.5).long())
loss.backward()
import importlib.util
import pandas  # other importers find them as usual
print(json.dumps({
    "loaded_with_monai": loaded_with_monai,
    "monai_has_scipy_signal": signal.has_iirnotch,
    "finders": sum(type(f).__name__ == "HideFromMonai" for f in sys.meta_path),
    "shape": list(y.shape),
    "loss_finite": bool(torch.isfinite(loss)),
    "later": [m for m in HIDDEN if m in sys.modules or importlib.util.find_spec(m)],
}))
"""


def test_monai_loads_without_the_hidden_packages_and_still_works():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded_with_monai"] == ["scipy.signal", "scipy.stats"]  # the ones from before
    assert result["monai_has_scipy_signal"]
    assert result["finders"] == 1
    assert result["shape"] == [1, 2, 32, 32, 32] and result["loss_finite"]
    assert sorted(result["later"]) == sorted(HIDDEN)


def test_every_ray_worker_of_the_job_installs_it(ray_session):
    @ray_session.remote(num_cpus=0.5)
    def finders() -> int:
        return sum(type(f).__name__ == "HideFromMonai" for f in sys.meta_path)

    assert ray_session.get(finders.remote()) == 1

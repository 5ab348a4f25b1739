"""MONAI in mixcl_ray's Ray workers loads without the optional packages it would import for
nothing (mixcl_ray.lean_monai), and everything mixcl_ray uses of MONAI still works."""

import json
import subprocess
import sys

from mixcl_ray.lean_monai import HIDDEN

# a fresh interpreter: this one may have MONAI and the hidden packages loaded already
SCRIPT = """
import json, sys
import numpy  # a package imported before the finder is installed is left as it is
from mixcl_ray.lean_monai import HIDDEN, hide_from_monai
hide_from_monai()
hide_from_monai()  # installed once
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
loaded_with_monai = [m for m in HIDDEN if m in sys.modules]
net = BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4))
x = torch.rand(1, 1, 32, 32, 32)
y = sliding_window_inference(x, (32, 32, 32), 1, net)
loss = DiceCELoss(to_onehot_y=True, softmax=True)(y, (x > 0.5).long())
loss.backward()
import matplotlib, mlflow, pandas, scipy.signal, sklearn  # other importers find them as usual
print(json.dumps({
    "loaded_with_monai": loaded_with_monai,
    "finders": sum(type(f).__name__ == "HideFromMonai" for f in sys.meta_path),
    "shape": list(y.shape),
    "loss_finite": bool(torch.isfinite(loss)),
    "later": [m for m in HIDDEN if m in sys.modules],
}))
"""


def test_monai_loads_without_the_hidden_packages_and_still_works():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded_with_monai"] == []
    assert result["finders"] == 1
    assert result["shape"] == [1, 2, 32, 32, 32] and result["loss_finite"]
    assert sorted(result["later"]) == sorted(HIDDEN)


def test_the_packages_are_hidden_from_monai_only():
    script = (
        "import sys\n"
        "from mixcl_ray.lean_monai import hide_from_monai\n"
        "hide_from_monai()\n"
        "import pandas\n"  # imported by someone else first: MONAI gets it as well
        "import monai.data.utils as u\n"
        "print(u.pd is pandas, 'matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.split()[-2:] == ["True", "False"]


def test_every_ray_worker_of_the_job_installs_it(ray_session):
    @ray_session.remote(num_cpus=0.5)
    def finders() -> int:
        return sum(type(f).__name__ == "HideFromMonai" for f in sys.meta_path)

    assert ray_session.get(finders.remote()) == 1

"""On a machine with a CUDA GPU: the backend's device choice and torch call, and the hooks' tensor
handling, with real CUDA tensors. Run by hand where a GPU is lent (it needs only torch and flask).

    python -m bench.gpu_check
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import numpy as np
    import torch

    import hooks
    from backend.loading import _torch_call, choose_device

    report: dict[str, object] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    device = choose_device("mlflow.pytorch")
    report["chosen_device"] = device
    assert device == "cuda", "a CUDA device is visible, so a torch model must get it"
    report["gpu"] = torch.cuda.get_device_name(0)

    module = torch.nn.Sequential(torch.nn.Linear(1, 2)).to(device)
    module.train()
    predict = _torch_call(module, device)
    batch = torch.tensor([[0.1], [0.9]])  # the pre hook made it on the CPU
    output = predict(batch)
    report["output_device"] = str(output.device)
    report["eval_mode"] = not module.training
    report["requires_grad"] = output.requires_grad
    assert output.device.type == "cuda" and not module.training and not output.requires_grad

    # A torchvision-style detection output left on the GPU: the ready post hook reads it as is.
    detections = [
        {
            "boxes": torch.tensor([[20.0, 10.0, 120.0, 60.0]], device=device),
            "labels": torch.tensor([1], device=device),
            "scores": torch.tensor([0.9], device=device),
        }
    ]
    import os
    import tempfile

    from PIL import Image

    path = os.path.join(tempfile.mkdtemp(), "a.png")
    Image.new("RGB", (200, 100)).save(path)
    post = hooks.torchvision_detection_post(class_names=["bg", "cat"], from_name="box", to_name="image")
    [prediction] = post(detections, inputs=[path])
    value = prediction["result"][0]["value"]
    report["box_percent"] = [value["x"], value["y"], value["width"], value["height"]]
    assert np.allclose(report["box_percent"], [10, 10, 50, 50])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

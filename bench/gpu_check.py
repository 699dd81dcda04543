"""On a machine with a CUDA GPU: the backend's device choice and torch call, the hooks' tensor
handling with real CUDA tensors, and a model process forked from a zygote that imported torch
(without touching CUDA) running its model on the GPU. Run by hand where a GPU is lent.

    python -m bench.gpu_check            (on a machine without a GPU: --cpu runs the same path on the CPU)
"""

from __future__ import annotations

import json
import sys

from lsmlflow.pickling import encode_hook


def main() -> int:
    import numpy as np
    import torch

    import hooks
    from backend.model.loading import _torch_call, choose_device

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
    report["model_process_device"] = model_process_device()
    assert report["model_process_device"].startswith("cuda")
    print(json.dumps(report, indent=2))
    return 0


def model_process_device() -> str:
    """Where a torch model runs in a model process forked from a zygote: the path every backend takes."""
    import tempfile
    from pathlib import Path

    import mlflow.pytorch
    import torch

    from backend.config.spec import ModelSpec
    from backend.isolation.modelprocess import ModelProcess
    from backend.isolation.zygote import Zygote
    
    folder = Path(tempfile.mkdtemp())
    model = torch.nn.Sequential(torch.nn.Linear(1, 2))
    mlflow.pytorch.save_model(model, str(folder / "model"), serialization_format="pickle")
    pre = encode_hook(lambda values: __import__("torch").tensor(values, dtype=__import__("torch").float32))
    post = encode_hook(lambda output: [str(output.device)] * len(output))
    spec = ModelSpec(model_uri=str(folder / "model"), loader="native", pre_hook=pre, post_hook=post)
    zygote = Zygote(("mlflow.pytorch", "torch")).start()
    process = ModelProcess(zygote, folder / "artifacts", 120)
    try:
        process.set_hooks(spec.digest, spec.pre_hook, spec.post_hook)
        process.load(spec)
        outputs, _ = process.call(spec.digest, [[0.1], [0.9]], None, None, "")
        return outputs[0]
    finally:
        process.stop()
        zygote.close()


if __name__ == "__main__":
    if "--cpu" in sys.argv:
        print(json.dumps({"model_process_device": model_process_device()}))
        sys.exit(0)
    sys.exit(main())

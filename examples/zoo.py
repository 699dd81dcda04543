"""The model zoo: a torchvision detector and segmenter and an ultralytics YOLO, small, built offline
(no weights are downloaded), whose answers follow the picture so a test can say where every box goes.

They need torchvision and ultralytics, which need a CUDA build of torch that the main environment does
not carry (see FACTS: the CPU torch there and the index's torchvision do not mix), so they live in a venv
of their own (``tests/support/zoo.py`` makes it) and are registered by running this module in it:
``python -m examples.zoo <tracking_uri>``.

What they see: a saturated red blob is a ``Moth``, a saturated blue one a ``Beetle`` (as the sklearn
``critters`` model does cell by cell). The networks are the real ones, with their real pre- and post-
processing (torchvision's transform, RoIAlign, box coder, NMS and mask pasting; ultralytics' letterbox,
NMS, box scaling and mask cropping); only where a trained network would have learnt something, a fixed
piece stands in: the region proposals come from the colour blobs, and the last layers' weights are set so
that a region's class follows its mean colour and its mask fills its box.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

CLASSES = ("Moth", "Beetle")  # class ids 1 and 2 in torchvision (0 is background), 0 and 1 in YOLO
DETECTOR_MODEL = "zoo_fasterrcnn"  # mlflow.pytorch: torchvision FasterRCNN
SEGMENTER_MODEL = "zoo_maskrcnn"  # mlflow.pytorch: torchvision MaskRCNN
YOLO_MODEL = "zoo_yolo"  # pyfunc wrapper around an ultralytics YOLO built from its yaml (detect)
YOLO_SEG_MODEL = "zoo_yolo_seg"  # the same, segmentation


def colour_blobs(image: Any) -> list[tuple[int, list[float]]]:
    """(class index into CLASSES, pixel xyxy box) of the red and the blue blob of a (3, H, W) 0..1 tensor."""
    found = []
    for index, channel in ((0, 0), (1, 2)):
        others = torch.stack([image[c] for c in range(3) if c != channel]).max(0).values
        mask = (image[channel] > 0.5) & (others < 0.3)
        if bool(mask.any()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            found.append((index, [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]))
    return found


class ColourProposals(nn.Module):
    """Stands in for the region proposal network: one proposal per colour blob, no training losses."""

    def forward(self, images: Any, features: Any, targets: Any = None) -> tuple[list[torch.Tensor], dict]:
        proposals = []
        for image in images.tensors:
            boxes = [box for _, box in colour_blobs(image)]
            proposals.append(torch.tensor(boxes, dtype=torch.float32, device=image.device).reshape(-1, 4))
        return proposals, {}


class Colours(nn.Module):
    """The backbone: the image's own three channels as the feature map (a 1x1 identity convolution)."""

    out_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _set_colour_head(box_head: Any, predictor: Any) -> None:
    """A region's class from its mean colour: fc6 averages each channel, fc7 passes them on, the class
    logits are red (Moth) or blue (Beetle) against the rest; the box deltas are zero (box = proposal)."""
    with torch.no_grad():
        for layer in (box_head.fc6, box_head.fc7, predictor.cls_score, predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        cells = box_head.fc6.weight.shape[1] // 3
        for channel in range(3):
            box_head.fc6.weight[channel, channel * cells : (channel + 1) * cells] = 1.0 / cells
            box_head.fc7.weight[channel, channel] = 1.0
        predictor.cls_score.weight[1, :3] = torch.tensor([20.0, -10.0, -10.0])  # Moth: red
        predictor.cls_score.weight[2, :3] = torch.tensor([-10.0, -10.0, 20.0])  # Beetle: blue
        predictor.cls_score.bias[1:] = -5.0


def torchvision_detector(masks: bool = False) -> Any:
    """A torchvision FasterRCNN (MaskRCNN with ``masks``) over the colour backbone; input: a list of (3, H, W)
    0..1 tensors, output: torchvision's dicts (boxes in pixels, labels 1 = Moth, 2 = Beetle, scores, masks)."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    options = {
        "num_classes": None, "min_size": 240, "max_size": 640, "image_mean": [0.0] * 3, "image_std": [1.0] * 3,
        "box_roi_pool": MultiScaleRoIAlign(["0"], 7, 2), "box_head": TwoMLPHead(3 * 7 * 7, 8),
        "box_predictor": FastRCNNPredictor(8, 3), "box_score_thresh": 0.3,
    }
    if masks:
        model = MaskRCNN(Colours(), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(3, [4], 1),
                         mask_predictor=MaskRCNNPredictor(4, 4, 3), **options)
        with torch.no_grad():  # every mask fills its box
            model.roi_heads.mask_predictor.mask_fcn_logits.weight.zero_()
            model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(10.0)
    else:
        model = FasterRCNN(Colours(), **options)
    model.rpn = ColourProposals()
    _set_colour_head(model.roi_heads.box_head, model.roi_heads.box_predictor)
    return model.eval()


def _yolo_classes() -> dict[str, type]:
    """The ultralytics models, subclassed where ultralytics is importable, and bound to this module's names
    so that a checkpoint unpickles them (by reference, through ``__getattr__`` below)."""
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    class ColourYolo(DetectionModel):
        """A YOLOv8n built from its yaml; the network runs, then its head's answer is replaced by one that
        follows the colour blobs, in the layout YOLO's head gives (xywh in input pixels, class scores),
        so ultralytics' own NMS, box scaling and Results make what the user's wrapper returns."""

        def forward(self, x, *args, **kwargs):
            answer = super().forward(x, *args, **kwargs)
            return _yolo_head(x, masks=False) if getattr(self, "follows_colours", False) else answer

    class ColourYoloSeg(SegmentationModel):
        """The segmentation variant: one mask coefficient per box and one prototype that fills every box."""

        def forward(self, x, *args, **kwargs):
            answer = super().forward(x, *args, **kwargs)
            return _yolo_head(x, masks=True) if getattr(self, "follows_colours", False) else answer

    made = {"ColourYolo": ColourYolo, "ColourYoloSeg": ColourYoloSeg}
    for cls in made.values():
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals().update(made)
    return made


def _yolo_head(x: torch.Tensor, masks: bool) -> Any:
    rows = 4 + len(CLASSES) + (1 if masks else 0)
    head = torch.zeros((x.shape[0], rows, len(CLASSES)), device=x.device)
    for b, image in enumerate(x):
        for index, (x0, y0, x1, y1) in colour_blobs(image):
            head[b, :4, index] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
            head[b, 4 + index, index] = 0.9
            if masks:
                head[b, -1, index] = 1.0
    if not masks:
        return head
    protos = torch.full((x.shape[0], 1, x.shape[2] // 4, x.shape[3] // 4), 10.0, device=x.device)
    return head, protos


def yolo_weights(folder: Any, masks: bool = False) -> str:
    """An ultralytics checkpoint of the colour YOLO (``yolov8n.yaml``, or ``yolov8n-seg.yaml``), no weights file read."""
    from pathlib import Path

    made = _yolo_classes()
    model = made["ColourYoloSeg" if masks else "ColourYolo"]("yolov8n-seg.yaml" if masks else "yolov8n.yaml",
                                                              nc=len(CLASSES), verbose=False)
    model.names = dict(enumerate(CLASSES))
    model.follows_colours = True  # not while building, when ultralytics runs the head to learn its strides
    path = Path(folder) / ("yolo-seg.pt" if masks else "yolo.pt")
    torch.save({"model": model, "train_args": {"task": "segment" if masks else "detect"}}, path)
    return str(path)


def __getattr__(name: str) -> Any:
    """ColourYolo and ColourYoloSeg, made on first use: unpickling a checkpoint finds them here."""
    if name in ("ColourYolo", "ColourYoloSeg"):
        return _yolo_classes()[name]
    raise AttributeError(name)


def yolo_python_model() -> Any:
    """The pyfunc wrapper a user writes around YOLO (its weights logged as an artifact)."""
    import mlflow.pyfunc

    class Yolo(mlflow.pyfunc.PythonModel):
        """Image paths in, one ultralytics ``Results`` per image out."""

        def load_context(self, context):
            from ultralytics import YOLO

            self.model = YOLO(context.artifacts["weights"])

        def predict(self, context, model_input, params=None):
            return self.model.predict(list(model_input), imgsz=320, conf=0.25, verbose=False)

    return Yolo()


def detector_train(paths: list[str], annotations: list[Any], current_model: Any = None, device: str = "cpu",
                   params: dict[str, Any] | None = None) -> Any:
    """A train_hook: the serving torchvision detector fine-tuned for a few SGD steps on the boxes the
    annotators drew (torchvision's own training losses; ``params``: ``steps``, ``lr``)."""
    import copy

    import hooks as ready

    params = params or {}
    model = copy.deepcopy(current_model).to(device)
    images = [image.to(device) for image in ready.images_to_tensors()(paths)]
    targets = []
    for image, results in zip(images, annotations):
        drawn = [box for box in ready.boxes(results, size=(image.shape[2], image.shape[1])) if box.label in CLASSES]
        targets.append({"boxes": torch.tensor([box[:4] for box in drawn], dtype=torch.float32, device=device).reshape(-1, 4),
                        "labels": torch.tensor([CLASSES.index(box.label) + 1 for box in drawn], dtype=torch.int64,
                                               device=device)})
        if model.roi_heads.has_mask():  # a Mask R-CNN learns masks too: each box filled, for want of drawn ones
            masks = torch.zeros((len(drawn), image.shape[1], image.shape[2]), dtype=torch.uint8, device=device)
            for n, box in enumerate(drawn):
                masks[n, int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)] = 1
            targets[-1]["masks"] = masks
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(params.get("lr", 1e-3)))
    model.train()
    for _ in range(int(params.get("steps", 3))):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().cpu()


def register_torchvision(tracking_uri: str) -> None:
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("zoo")
    for name, masks in ((DETECTOR_MODEL, False), (SEGMENTER_MODEL, True)):
        with mlflow.start_run():
            mlflow.pytorch.log_model(torchvision_detector(masks), name="model", registered_model_name=name,
                                     serialization_format="pickle",
                                     pip_requirements=["torch", "torchvision"])
        mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")  # where training starts


def register_yolo(tracking_uri: str) -> None:
    import tempfile

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("zoo")
    with tempfile.TemporaryDirectory() as folder:
        for name, masks in ((YOLO_MODEL, False), (YOLO_SEG_MODEL, True)):
            with mlflow.start_run():
                mlflow.pyfunc.log_model(name="model", python_model=yolo_python_model(), registered_model_name=name,
                                        artifacts={"weights": yolo_weights(folder, masks)},
                                        pip_requirements=["ultralytics", "torch", "torchvision"])


if __name__ == "__main__":
    import importlib

    zoo = importlib.import_module("examples.zoo")  # this module by its importable name: its classes pickle by reference

    zoo.register_torchvision(sys.argv[1])
    zoo.register_yolo(sys.argv[1])

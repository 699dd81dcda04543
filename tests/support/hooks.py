"""Hooks the tests send to backends, written the way users write them (self-contained functions)."""

from __future__ import annotations

from examples.hooks import (  # noqa: F401
    IMAGE_CONFIG,
    TEXT_CONFIG,
    brightness_pre,
    choices_post,
    critter_boxes_post,
    critter_cells_pre,
    pipeline_train,
    sentiment_post,
    sentiment_train,
)


def torch_brightness_pre(paths):
    import numpy as np
    import torch
    from PIL import Image

    values = [[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths]
    return torch.tensor(values, dtype=torch.float32)


def onnx_brightness_pre(paths):
    """The ONNX export takes float32, as exported graphs do."""
    import numpy as np
    from PIL import Image

    return np.array([[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths], dtype=np.float32)


def onnx_choices_post(outputs):
    """onnxruntime's outputs by name: the labels, and each label's probability for the score."""
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}],
         "score": float(max(probabilities))}
        for label, probabilities in zip(outputs["label"], outputs["probabilities"])
    ]


def torch_choices_post(logits):
    names = ["dark", "light"]
    probs = logits.softmax(dim=1)
    return [
        {
            "result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [names[int(p.argmax())]]}}],
            "score": float(p.max()),
        }
        for p in probs
    ]


def torch_choices_scores_post(logits):
    """Choices with the softmax over both labels as the result's scores (what Antenna's classifications carry)."""
    names = ["dark", "light"]
    probs = logits.softmax(dim=1)
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices",
                     "value": {"choices": [names[int(p.argmax())]]}, "score": float(p.max()),
                     "scores": {"dark": float(p[0]), "light": float(p[1])}}]}
        for p in probs
    ]


def antenna_shaped_post(logits):
    """Antenna's own shape, as a hook that knows it may write: a box, a label, its scores; the rest is filled in."""
    return [{"detections": [{"bbox": [1, 2, 3, 4], "classifications": [{"classification": "light", "scores": [0.25, 0.75]}]}]}
            for _ in logits]


def undeclared_algorithm_post(probabilities, inputs):
    """Antenna's shape naming an algorithm /info never declared: Antenna could not save it."""
    return [{"detections": [{"bbox": [0, 0, 1, 1], "algorithm": "yolo-v8"}]} for _ in inputs]


def wasp_box_post(probabilities, inputs):
    """A box labelled with a class the detector's labeling config does not have."""
    region = {"from_name": "critter", "to_name": "image", "type": "rectanglelabels",
              "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["Wasp"]}}
    return [{"result": [region]} for _ in inputs]


def wrong_label_post(labels):
    """Results that do not fit IMAGE_CONFIG: a label the config does not have."""
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": ["purple"]}}]}
        for _ in labels
    ]


def numpy_post(labels):
    """Scores and labels as numpy leaves them."""
    import numpy as np

    return [
        {
            "result": [
                {"from_name": "brightness", "to_name": "image", "type": "choices",
                 "value": {"choices": [np.str_(label)]}, "score": np.float32(0.25) + i / 2}
            ],
            "meta": {"logits": np.array([0.25, 0.75])},
        }
        for i, label in enumerate(labels)
    ]


def scored_choices_post(labels):
    """choices_post with a score: another hook set for the same model (a hooks-only configure)."""
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}],
         "score": 0.5}
        for label in labels
    ]


def set_post(labels):
    """A value JSON cannot carry."""
    return [dict(prediction, meta={"labels": {str(label)}}) for prediction, label in zip(choices_post(labels), labels)]


def nan_score_post(labels):
    """A region score JSON cannot carry."""
    predictions = choices_post(labels)
    predictions[-1]["result"][0]["score"] = float("nan")
    return predictions


def short_post(labels):
    """One prediction too few."""
    return choices_post(labels)[:-1]


def raising_pre(paths):
    raise ValueError("this pre hook always fails")


def slow_post(labels):
    import time

    time.sleep(1.5)
    return choices_post(labels)


def sleeping_post(seconds):
    """A post hook that takes ``seconds`` per call."""

    def post(labels):
        import time

        time.sleep(seconds)
        return choices_post(labels)

    return post


def recording_post(path, seconds):
    """A post hook that takes ``seconds`` per call and appends the id of every task it predicts to ``path``
    (one line each, whichever process runs it): how a test counts the model's work across workers."""

    def post(labels, tasks):
        import time

        time.sleep(seconds)
        with open(path, "a") as handle:
            handle.write("".join(f"{task['id']}\n" for task in tasks))
        return choices_post(labels)

    return post


def box_post(labels, inputs):
    """For a RectangleLabels project: a centred box over half of each image, labelled by the model."""
    import hooks as ready

    predictions = []
    for label, path in zip(labels, inputs):
        width, height = ready.image_size(path)
        box = (width / 4, height / 4, 3 * width / 4, 3 * height / 4)
        region = ready.rectangle(box, str(label), width=width, height=height, from_name="box", to_name="image", score=0.9)
        predictions.append(ready.prediction([region]))
    return predictions


def ending_pre(how):
    """A pre hook that, for images named black, ends its process the careless way ``how`` names."""

    def pre(paths):
        if any("black" in str(p) for p in paths):
            import os
            import sys

            if how == "sys.exit":
                sys.exit(3)
            if how == "exit":
                exit()  # noqa: PLR1722 - the careless way is the point
            if how == "KeyboardInterrupt":
                raise KeyboardInterrupt
            if how.startswith("os._exit"):
                os._exit(int(how[-2]))  # os._exit(3) is gunicorn's own "worker failed to boot" code
            if how == "segfault":
                import ctypes

                ctypes.string_at(0)
        return brightness_pre(paths)

    return pre


def hanging_post(labels):
    """A post hook that never comes back (as far as anyone waiting can tell)."""
    import time

    time.sleep(3600)


def sleeping_sentiment_post(per_item_s):
    """The sentiment post hook of a model that costs ``per_item_s`` a task."""

    def post(labels):
        import time

        time.sleep(per_item_s * len(labels))
        return sentiment_post(labels)

    return post


def environment_peeking_post(labels):
    """A post hook that reads the backend's own credentials from its environment, and reports them."""
    import os

    return [dict(p, meta={"key": os.environ.get("LABEL_STUDIO_API_KEY"), "token": os.environ.get("CONFIGURE_TOKEN")})
            for p in choices_post(labels)]


def gpu_peeking_post(labels):
    """A post hook that reports the GPUs its process may see (what a driver gave the backend)."""
    import os

    return [dict(p, meta={"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) for p in choices_post(labels)]


def ancestry_peeking_post(labels):
    """A post hook that reports its process's ancestors (pid and command line, nearest first) and whether the
    backend's Label Studio key is anywhere in its environment, the one Python sees or the one /proc shows."""
    import os

    chain, pid = [], os.getpid()
    while pid > 1 and len(chain) < 6:
        with open(f"/proc/{pid}/stat") as stat:
            parent = int(stat.read().rpartition(")")[2].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            chain.append([pid, cmdline.read().replace(b"\0", b" ").decode()])
        pid = parent
    with open("/proc/self/environ", "rb") as environ:
        started_with = environ.read().decode(errors="replace")
    seen = "envkey" in started_with or any("envkey" in value for value in os.environ.values())
    return [dict(p, meta={"ancestors": chain, "key_seen": seen}) for p in choices_post(labels)]

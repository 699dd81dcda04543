"""Post hooks that turn the small fixture models' answers into every kind of region an image or text
project draws, with the ready-made builders of ``hooks``, at places a browser test can predict: the
brightness model's label goes on a polygon, a brush, a keypoint or a captioned box over each image's
centred half; the sentiment model's label on the first word of each text. Their configs beside them."""

from __future__ import annotations

POLYGON_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<PolygonLabels name="outline" toName="image"><Label value="dark"/><Label value="light"/></PolygonLabels></View>'
)
BRUSH_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="dark"/><Label value="light"/></BrushLabels></View>'
)
KEYPOINT_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<KeyPointLabels name="point" toName="image"><Label value="dark"/><Label value="light"/></KeyPointLabels></View>'
)
CAPTION_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image"><Label value="dark"/><Label value="light"/></RectangleLabels>'
    '<TextArea name="caption" toName="image" perRegion="true" editable="true" required="false"/></View>'
)
SPAN_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Labels name="tone" toName="text"><Label value="positive"/><Label value="negative"/></Labels></View>'
)


def polygon_post(labels, inputs):
    """A diamond through the midpoints of the centred half's sides."""
    import hooks as ready

    predictions = []
    for label, path in zip(labels, inputs):
        w, h = ready.image_size(path)
        points = [(w / 2, h / 4), (3 * w / 4, h / 2), (w / 2, 3 * h / 4), (w / 4, h / 2)]
        region = ready.polygon(points, str(label), width=w, height=h, from_name="outline", to_name="image", score=0.8)
        predictions.append(ready.prediction([region]))
    return predictions


def brush_post(labels, inputs):
    """A mask of the centred half."""
    import numpy as np

    import hooks as ready

    predictions = []
    for label, path in zip(labels, inputs):
        w, h = ready.image_size(path)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
        predictions.append(ready.prediction([ready.brush(mask, str(label), from_name="mask", to_name="image", score=0.7)]))
    return predictions


def keypoint_post(labels, inputs):
    """A point a quarter in from the left, three quarters down."""
    import hooks as ready

    predictions = []
    for label, path in zip(labels, inputs):
        w, h = ready.image_size(path)
        point = ready.keypoint(w / 4, 3 * h / 4, str(label), width=w, height=h, from_name="point", to_name="image",
                               size=1.0, score=0.6)
        predictions.append(ready.prediction([point]))
    return predictions


def caption_post(labels, inputs):
    """The centred half boxed, with a per-region caption saying what the model saw."""
    import hooks as ready

    predictions = []
    for label, path in zip(labels, inputs):
        w, h = ready.image_size(path)
        box = ready.rectangle((w / 4, h / 4, 3 * w / 4, 3 * h / 4), str(label), width=w, height=h, from_name="box",
                              to_name="image", score=0.9)
        caption = ready.textarea(f"looks {label}", from_name="caption", to_name="image", region=box)
        predictions.append(ready.prediction([box, caption]))
    return predictions


def first_word_post(labels, inputs):
    """The first word of each text, labelled with the text's sentiment (``inputs``: the texts)."""
    import hooks as ready

    predictions = []
    for label, text in zip(labels, inputs):
        end = len(text.split()[0])
        region = ready.span(0, end, str(label), text=text, from_name="tone", to_name="text", score=0.9)
        predictions.append(ready.prediction([region]))
    return predictions

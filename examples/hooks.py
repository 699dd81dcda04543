"""Hooks for the demo models: what a user writes for a classification or a detection project.

``pre_hook`` turns the tasks' image files into the model's input (mean grey level, 0..1);
``post_hook`` turns the model's labels into one Label Studio prediction per task. The critter
detector's hooks draw boxes with labels and full score vectors, which Antenna's pipelines use too.
"""

from __future__ import annotations

IMAGE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="brightness" toName="image"><Choice value="dark"/><Choice value="light"/></Choices></View>'
)
DETECTOR_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="critter" toName="image">'
    '<Label value="Moth" taxon_rank="ORDER"/><Label value="Beetle" taxon_rank="ORDER"/></RectangleLabels></View>'
)
TEXT_CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Choices name="sentiment" toName="text"><Choice value="positive"/><Choice value="negative"/></Choices></View>'
)



def brightness_pre(paths):
    import numpy as np
    from PIL import Image

    return np.array([[np.asarray(Image.open(p).convert("L"), dtype=float).mean() / 255.0] for p in paths])


def choices_post(labels):
    return [
        {"result": [{"from_name": "brightness", "to_name": "image", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def sentiment_post(labels):
    return [
        {"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [str(label)]}}]}
        for label in labels
    ]


def sentiment_train(texts, annotations, params=None):
    """A train_hook: a text classifier fitted to what annotators chose; it improves as you label."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from hooks import choice_labels

    params = params or {}
    model = make_pipeline(CountVectorizer(), LogisticRegression(C=float(params.get("C", 10.0))))
    return model.fit(texts, choice_labels(annotations))


def pipeline_train(texts, annotations, current_model=None, params=None):
    """A train_hook for a transformers text-classification pipeline: the serving pipeline's classification
    head fine-tuned on what annotators chose (``params``: ``steps``, ``lr``), returned as a pipeline with
    its tokenizer."""
    import torch
    from transformers import pipeline

    from hooks import choice_labels

    params = params or {}
    model, tokenizer = current_model.model, current_model.tokenizer
    chosen = [(text, label) for text, label in zip(texts, choice_labels(annotations)) if label in model.config.label2id]
    batch = tokenizer([text for text, _ in chosen], padding=True, return_tensors="pt")
    labels = torch.tensor([model.config.label2id[label] for _, label in chosen])
    head = getattr(model, "classifier", None) or model  # the head only: a few examples should move it, not the rest
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(params.get("lr", 0.3)))
    model.train()
    for _ in range(int(params.get("steps", 30))):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return pipeline("text-classification", model=model.eval(), tokenizer=tokenizer)


def critter_cells_pre(paths):
    """Each image as the mean colour of each cell of a 4x4 grid: 16 rows of (r, g, b) per image."""
    import numpy as np
    from PIL import Image

    rows = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float) / 255.0
        height, width, _ = pixels.shape
        for gy in range(4):
            for gx in range(4):
                cell = pixels[gy * height // 4:(gy + 1) * height // 4, gx * width // 4:(gx + 1) * width // 4]
                rows.append(cell.reshape(-1, 3).mean(axis=0))
    return np.array(rows)


def critter_boxes_post(probabilities, inputs):
    """A box per cell that is not background, labelled with the likeliest class and every class's score."""
    import hooks as ready

    classes = ["Beetle", "Moth", "background"]
    predictions = []
    for i, path in enumerate(inputs):
        width, height = ready.image_size(path)
        regions = []
        for k, p in enumerate(probabilities[i * 16:(i + 1) * 16]):
            best = max(range(3), key=lambda c: p[c])
            if classes[best] == "background":
                continue
            gx, gy = k % 4, k // 4
            box = (gx * width / 4, gy * height / 4, (gx + 1) * width / 4, (gy + 1) * height / 4)
            region = ready.rectangle(box, classes[best], width=width, height=height, from_name="critter",
                                     to_name="image", score=float(p[best]))
            region["scores"] = {"Moth": float(p[1]), "Beetle": float(p[0])}
            regions.append(region)
        predictions.append(ready.prediction(regions))
    return predictions

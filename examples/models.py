"""Small real models for the quickstart and the tests, trained in seconds, registered in an MLflow registry.

``python -m examples.models <tracking_uri> [--no-torch]`` registers them all (a separate process keeps
MLflow's process-wide state out of the caller); ``--no-torch`` only the scikit-learn ones, which
requirements.txt alone can load (the torch and ONNX ones need requirements-dev.txt).
"""

from __future__ import annotations

import sys

import numpy as np

IMAGE_MODEL = "brightness"  # sklearn: mean grey level of an image -> "dark" / "light"
TEXT_MODEL = "sentiment"  # sklearn pipeline: text -> "positive" / "negative"
TORCH_MODEL = "tiny_torch"  # torch module: (n, 1) brightness -> logits of (dark, light)
NER_MODEL = "tiny_ner"  # transformers token-classification pipeline: PER and LOC spans, wired by hand
SENTIMENT_PIPELINE = "tiny_sentiment"  # transformers text-classification pipeline: positive / negative
ONNX_MODEL = "brightness_onnx"  # the brightness classifier exported by skl2onnx, run by onnxruntime
SENTIMENT_PROBA_MODEL = "sentiment_proba"  # the sentiment pipeline answering predict_proba: how sure it is, per class
DETECTOR_MODEL = "critters"  # sklearn: a grid cell's mean colour -> P(Beetle, Moth, background); hooks make boxes
# What each model needs to be served, said rather than inferred: MLflow infers it by loading the model
# again in a new Python, seconds per model.
SKLEARN = ["scikit-learn"]


def train_brightness():
    from sklearn.linear_model import LogisticRegression

    x = np.linspace(0.0, 1.0, 21).reshape(-1, 1)
    y = np.where(x[:, 0] > 0.5, "light", "dark")
    return LogisticRegression().fit(x, y)


def train_sentiment():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = ["great good lovely", "good fine great", "wonderful great", "bad awful", "terrible bad", "awful horrid bad"]
    labels = ["positive", "positive", "positive", "negative", "negative", "negative"]
    return make_pipeline(CountVectorizer(), LogisticRegression()).fit(texts, labels)


def train_critters():
    """Red cells are moths, blue ones beetles, dark ones background: a detector when run cell by cell."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    low, high = rng.uniform(0.0, 0.3, (300, 3)), rng.uniform(0.7, 1.0, (300, 1))
    moths = np.hstack([high[:100], low[:100, 1:]])
    beetles = np.hstack([low[100:200, :2], high[100:200]])
    background = low[200:] * 0.6
    x = np.vstack([moths, beetles, background])
    y = ["Moth"] * 100 + ["Beetle"] * 100 + ["background"] * 100
    return LogisticRegression(C=100.0, max_iter=1000).fit(x, y)


def make_tiny_torch():
    import torch

    class Brightness(torch.nn.Module):
        """Logits (dark, light) from a brightness in [0, 1]: a fixed linear layer, no training needed."""

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1, 2)
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor([[-10.0], [10.0]]))
                self.linear.bias.copy_(torch.tensor([5.0, -5.0]))

        def forward(self, x):
            return self.linear(x)

    return Brightness()


def export_brightness_onnx():
    """The brightness classifier as ONNX (float32 input "brightness"; outputs "label" and "probabilities")."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = train_brightness()
    return convert_sklearn(model, initial_types=[("brightness", FloatTensorType([None, 1]))],
                           options={id(model): {"zipmap": False}}, target_opset=17)


# Tiny transformers pipelines whose answers follow their input: a word-level tokenizer built here (no
# download), BERT configs a few numbers wide, and weights set by hand so that each word's kind reaches
# the classifier unchanged (a test can say what they will answer).
TINY_WORDS = {"ada": 1, "lovelace": 1, "london": 2, "paris": 2, "great": 3, "lovely": 3, "good": 3, "wonderful": 3,
              "awful": 4, "bad": 4, "terrible": 4}
TINY_WIDTH = 5


def _tiny_pattern(kind: int) -> list[float]:
    """A zero-mean vector peaking at ``kind``: it comes through LayerNorm pointing the same way."""
    vector = [-1.0] * TINY_WIDTH
    vector[kind] = float(TINY_WIDTH - 1)
    return vector


def _tiny_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _tiny_bert(model_class, labels: list[str], layers: int):
    import torch
    from transformers import BertConfig

    words = sorted(TINY_WORDS) + ["day", "weather", "lived", "in", "."]
    config = BertConfig(vocab_size=4 + len(words), hidden_size=TINY_WIDTH, num_hidden_layers=layers,
                        num_attention_heads=1, intermediate_size=8, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    model = model_class(config)
    with torch.no_grad():
        embeddings = model.bert.embeddings
        for index, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words):
            embeddings.word_embeddings.weight[index] = torch.tensor(_tiny_pattern(TINY_WORDS.get(word, 0)))
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
    return model.eval(), _tiny_tokenizer(words)


def tiny_ner_pipeline():
    """Token classification: the words of a name are PER, of a city LOC (aggregated into spans)."""
    import torch
    from transformers import BertForTokenClassification, pipeline

    model, tokenizer = _tiny_bert(BertForTokenClassification, ["O", "PER", "LOC"], layers=0)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([_tiny_pattern(k) for k in (0, 1, 2)]))
        model.classifier.bias.zero_()
    return pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple")


def tiny_sentiment_pipeline(backwards: bool = False):
    """Text classification: more good words than bad is positive (negative, ``backwards``). One layer whose
    attention averages the words into [CLS] (queries and keys zero, values the identity); no feed-forward."""
    import torch
    from transformers import BertForSequenceClassification, pipeline

    model, tokenizer = _tiny_bert(BertForSequenceClassification, ["negative", "positive"], layers=1)
    identity = torch.eye(TINY_WIDTH)
    with torch.no_grad():
        layer = model.bert.encoder.layer[0]
        attention = layer.attention.self
        for linear in (attention.query, attention.key, layer.intermediate.dense, layer.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        for linear in (attention.value, layer.attention.output.dense, model.bert.pooler.dense):
            linear.weight.copy_(identity)
            linear.bias.zero_()
        rows = [_tiny_pattern(4), _tiny_pattern(3)]
        model.classifier.weight.copy_(torch.tensor(rows[::-1] if backwards else rows))
        model.classifier.bias.zero_()
    return pipeline("text-classification", model=model, tokenizer=tokenizer)


def train_wrong_sentiment():
    """A sentiment model that has it backwards: what a first, badly trained version looks like."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = ["great good lovely", "good fine great", "wonderful great", "bad awful", "terrible bad", "awful horrid bad"]
    labels = ["negative", "negative", "negative", "positive", "positive", "positive"]
    return make_pipeline(CountVectorizer(), LogisticRegression()).fit(texts, labels)


def register_trainable(tracking_uri: str, names: list[str], alias: str = "champion", flavor: str = "sklearn") -> None:
    """Version 1 of each name, a sentiment model that has it backwards, with ``alias`` on it: where training
    starts. ``flavor``: a scikit-learn pipeline, or a transformers text-classification pipeline."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fixtures")
    for name in names:
        with mlflow.start_run():
            if flavor == "transformers":
                import mlflow.transformers

                mlflow.transformers.log_model(tiny_sentiment_pipeline(backwards=True), name="model",
                                              registered_model_name=name, task="text-classification",
                                              pip_requirements=["transformers", "tokenizers", "torch"])
            else:
                mlflow.sklearn.log_model(train_wrong_sentiment(), name="model", registered_model_name=name,
                                         pip_requirements=SKLEARN)
        mlflow.MlflowClient().set_registered_model_alias(name, alias, "1")


def register_all(tracking_uri: str, with_torch: bool = True) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fixtures")
    with mlflow.start_run():
        mlflow.sklearn.log_model(train_brightness(), name="brightness", registered_model_name=IMAGE_MODEL,
                                 pip_requirements=SKLEARN)
    with mlflow.start_run():
        # A second version that says the opposite, so tests can tell versions apart.
        flipped = train_brightness()
        flipped.classes_ = flipped.classes_[::-1].copy()
        mlflow.sklearn.log_model(flipped, name="brightness", registered_model_name=IMAGE_MODEL, pip_requirements=SKLEARN)
    mlflow.MlflowClient().set_registered_model_alias(IMAGE_MODEL, "champion", "1")
    with mlflow.start_run():
        mlflow.sklearn.log_model(train_sentiment(), name="sentiment", registered_model_name=TEXT_MODEL,
                                 pip_requirements=SKLEARN)
    with mlflow.start_run():
        mlflow.sklearn.log_model(train_sentiment(), name="sentiment", registered_model_name=SENTIMENT_PROBA_MODEL,
                                 pyfunc_predict_fn="predict_proba", pip_requirements=SKLEARN)
    with mlflow.start_run():
        mlflow.sklearn.log_model(train_critters(), name="critters", registered_model_name=DETECTOR_MODEL,
                                 pyfunc_predict_fn="predict_proba", pip_requirements=SKLEARN)
    if with_torch:
        import mlflow.pytorch

        with mlflow.start_run():
            mlflow.pytorch.log_model(
                make_tiny_torch(), name="tiny", registered_model_name=TORCH_MODEL, serialization_format="pickle",
                pip_requirements=["torch"],
            )
        import mlflow.onnx
        import mlflow.transformers

        needs = ["transformers", "tokenizers", "torch"]  # said, not inferred (inference looks for torchvision)
        with mlflow.start_run():
            mlflow.transformers.log_model(tiny_ner_pipeline(), name="ner", registered_model_name=NER_MODEL,
                                          task="token-classification", pip_requirements=needs)
        with mlflow.start_run():
            mlflow.transformers.log_model(tiny_sentiment_pipeline(), name="sentiment",
                                          registered_model_name=SENTIMENT_PIPELINE, task="text-classification",
                                          pip_requirements=needs)

        with mlflow.start_run():
            mlflow.onnx.log_model(export_brightness_onnx(), name="brightness_onnx", registered_model_name=ONNX_MODEL,
                                  pip_requirements=["onnx", "onnxruntime"])


if __name__ == "__main__":
    if "--trainable" in sys.argv:  # python -m examples.models <uri> --trainable <name>[,<name>...] [--transformers]
        register_trainable(sys.argv[1], sys.argv[sys.argv.index("--trainable") + 1].split(","),
                           flavor="transformers" if "--transformers" in sys.argv else "sklearn")
    else:
        register_all(sys.argv[1], with_torch="--no-torch" not in sys.argv)

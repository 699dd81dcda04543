"""Label Studio's side of a prediction: labeling configs parsed with label-studio-sdk, predictions
validated against them (and the rules the labeling UI adds), answers shaped for /predict.

May import: core.
"""

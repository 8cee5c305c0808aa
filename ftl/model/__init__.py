"""The Ray-free model code: backbones, weights, heads, image decoding and the registered image model.

Nothing here imports Ray, pydantic or MLflow: the registered image model ships this package alone.
"""

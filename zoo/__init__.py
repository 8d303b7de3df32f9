"""The attention zoo: attention-centric vision models registered in timm, over one kernel core.

`import zoo` registers every zoo model, so `timm.create_model(name)` works for zoo names too.
"""
from ._registry import create_model, is_zoo_model, list_models, load_checkpoint, model_family, register_model
from . import models  # noqa: F401  (registers the model families)
from .accelerate import accelerate

__all__ = ["accelerate", "create_model", "list_models", "register_model", "model_family", "load_checkpoint",
           "is_zoo_model"]

"""End-to-end workflows over the zoo: diffusers pipelines, LMM methods, probe training, demos."""

# Lazy exports: heavy dependencies (diffusers, transformers) load only when a name is first used.
_LAZY_EXPORTS = {
    "FreeSwimWanPipeline": "pipelines.freeswim",
}


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

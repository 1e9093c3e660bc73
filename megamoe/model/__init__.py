"""Decoder LM built from plain single-device modules (see transformer.py)."""


def __getattr__(name):
    # Lazy so that megamoe.moe can import megamoe.model.mlp without a circular import.
    from megamoe.model import transformer
    return getattr(transformer, name)

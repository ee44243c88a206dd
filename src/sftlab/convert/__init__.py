"""Converters from other checkpoint formats into plain HF directories that `sftlab.models.load_model` reads."""

from sftlab.convert.llama2c import convert as convert_llama2c

__all__ = ["convert_llama2c"]

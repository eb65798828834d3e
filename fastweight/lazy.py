"""Module attributes imported on first use (PEP 562), so that importing a package (and building
the CLI parsers) does not import torch or transformers."""
from __future__ import annotations

import importlib
import sys
from typing import Callable

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, sources: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for module ``package``, whose attribute ``name`` is imported
    from module ``sources[name]`` on first access and then cached in the module."""

    def __getattr__(name: str):
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(sources))

    return __getattr__, __dir__

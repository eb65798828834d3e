"""The optional C++/CUDA extension ``fastweight._C``: what to build (:mod:`.build`, shared with
setup.py) and how it is loaded or JIT-built once per process (:mod:`.loader`)."""
from fastweight.extension.loader import Status, load

__all__ = ["Status", "load"]

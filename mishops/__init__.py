"""mishops: the ``Conv2d -> Mish -> Mish`` block as fast as the hardware allows.

``mish2(x)`` computes ``F.mish(F.mish(x))`` in one pass with the fastest correct backend for the
input (inline CUDA C++, Triton, CuPy or eager PyTorch); ``ModelNew`` is the whole block.
"""

from mishops.dispatch import NoBackendError
from mishops.model import ModelNew
from mishops.ops import mish2
from mishops.registry import Availability, Backend, register
from mishops.tuning import TUNER, tune

__version__ = "0.1.0"


def last_choices():
    """The choices made in this process, oldest first (tuned, cached, named alike), each with what
    every candidate measured."""
    return TUNER.last_choices()


def registered_backends():
    """Every registered backend, in preference order, keyed by name.

    (Not ``mishops.backends``: that name is the subpackage holding the built-in backends.)
    """
    from mishops import registry

    return registry.backends()


__all__ = ["Availability", "Backend", "ModelNew", "NoBackendError", "last_choices", "mish2", "register",
           "registered_backends", "tune", "__version__"]

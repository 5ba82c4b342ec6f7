"""mishops: the ``Conv2d -> Mish -> Mish`` block as fast as the hardware allows.

``mish2(x)`` computes ``F.mish(F.mish(x))`` in one pass with the fastest correct backend for the
input (inline CUDA C++, Triton, CuPy or eager PyTorch); ``ModelNew`` is the whole block;
``fuse(model)`` puts the block in place of every ``Conv2d -> [BatchNorm2d ->] Mish [-> Mish]`` of a
model; ``mishops.nn`` has the block as modules (``ConvMish2d``, ``ConvMishMish2d``).
"""

from mishops import nn
from mishops.dispatch import NoBackendError
from mishops.fuse import FuseReport, fuse
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


__all__ = ["Availability", "Backend", "FuseReport", "ModelNew", "NoBackendError", "fuse", "last_choices", "mish2", "nn",
           "register", "registered_backends", "tune", "__version__"]

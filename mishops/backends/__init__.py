"""Built-in backends, one per file; importing this package registers them.

Each module imports its optional dependency (a compiler, Triton, CuPy) only inside
``is_available`` and the kernels, so importing mishops never fails for a missing one.
"""

from mishops.backends import cuda, cupy, eager, triton  # noqa: F401

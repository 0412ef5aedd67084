"""Networks: the registry (`registry.py`), the architectures it holds, and the losses they train with.

Importing the architecture modules here registers them, so `create_model` sees every built-in model whichever
module of this package is imported first (Python runs this file before any submodule).
"""

from raydistill.models import classic, convnet  # noqa: F401  (imported for their @register_model side effect)

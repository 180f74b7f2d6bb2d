"""dynasparse: compiler passes that make transformer inference spend compute only where it matters."""
from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import BaseConfig, CanonicalizeConfig
from dynasparse.errors import DynasparseError

__all__ = ["BaseConfig", "CanonicalizeConfig", "DynasparseError", "OptimizedModel", "optimize"]
__version__ = "0.1.0"

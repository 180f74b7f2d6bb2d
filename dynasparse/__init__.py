"""dynasparse: compiler passes that make transformer inference spend compute only where it matters."""
from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import BaseConfig, CanonicalizeConfig, SparseAttentionConfig, TokenMergeConfig
from dynasparse.errors import DynasparseError
from dynasparse.export.onnx import export_onnx
from dynasparse.runtime.ort import ort_session

__all__ = ["BaseConfig", "CanonicalizeConfig", "DynasparseError", "OptimizedModel", "SparseAttentionConfig",
           "TokenMergeConfig", "export_onnx",
           "optimize", "ort_session"]
__version__ = "0.1.0"

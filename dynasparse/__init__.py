"""dynasparse: compiler passes that make transformer inference spend compute only where it matters."""
from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import (BaseConfig, CanonicalizeConfig, ExitGateConfig, KVEvictionConfig,
                               SparseAttentionConfig, TokenMergeConfig)
from dynasparse.errors import DynasparseError
from dynasparse.export.onnx import export_onnx
from dynasparse.runtime.generate import generate
from dynasparse.runtime.ort import ort_session

__all__ = ["BaseConfig", "CanonicalizeConfig", "DynasparseError", "ExitGateConfig", "KVEvictionConfig",
           "OptimizedModel", "SparseAttentionConfig", "TokenMergeConfig", "export_onnx", "generate", "optimize",
           "ort_session"]
__version__ = "0.1.0"

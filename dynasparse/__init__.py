"""dynasparse: compiler passes that make transformer inference spend compute only where it matters."""
from dynasparse.api import OptimizedModel, optimize
from dynasparse.config import BaseConfig, CanonicalizeConfig
from dynasparse.errors import DynasparseError
from dynasparse.export.onnx import export_onnx
from dynasparse.fit import FitReport, fit
from dynasparse.passes.retrieval_heads import HeadScores, calibrate_retrieval_heads
from dynasparse.registry import all_techniques
from dynasparse.runtime.generate import generate
from dynasparse.runtime.ort import ort_session
from dynasparse.runtime.reread import repeat_prompt
from dynasparse.runtime.sampler import Sampled, sample
from dynasparse.runtime.unmask import Unmasked, unmask
from dynasparse import techniques  # noqa: F401  (each record registers itself on import)

# every technique's config (TokenMergeConfig, SparseAttentionConfig, KVEvictionConfig, ExitGateConfig, ...):
# each is declared by its technique's record, so a new technique needs no line here
_CONFIGS = {technique.config.__name__: technique.config for technique in all_techniques()}
globals().update(_CONFIGS)

__all__ = ["BaseConfig", "CanonicalizeConfig", "DynasparseError", "FitReport", "HeadScores", "OptimizedModel",
           "Sampled", "calibrate_retrieval_heads", "export_onnx", "fit", "generate", "optimize", "ort_session",
           "Unmasked", "repeat_prompt", "sample", "unmask", *_CONFIGS]
__version__ = "0.1.0"

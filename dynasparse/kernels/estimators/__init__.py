"""Block estimators for sparse attention, one module per method, and the registry by name.

An estimator scores every (query block, KV block) pair with an estimate of the log of the attention mass
there; ``build_plan`` then keeps the best blocks. Adding an estimator is a module here and a line in
``ESTIMATORS``: the config, the tests and the benchmarks read the names from it.
"""
from dynasparse.kernels.estimators.antidiagonal import antidiagonal_scores
from dynasparse.kernels.estimators.base import Estimator, EstimatorInputs
from dynasparse.kernels.estimators.pooled import pooled_scores
from dynasparse.kernels.estimators.streaming import streaming_scores
from dynasparse.kernels.estimators.vertical_slash import vertical_slash_scores

ESTIMATORS: dict[str, Estimator] = {"pooled": pooled_scores, "vertical_slash": vertical_slash_scores,
                                    "antidiagonal": antidiagonal_scores, "streaming": streaming_scores}

__all__ = ["ESTIMATORS", "Estimator", "EstimatorInputs"]

"""What the passes share beyond the pass contract (``dynasparse.registry``): reading calibration batches."""
import torch


def calibration_call(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of one calibration batch: a tensor, a tuple of positional tensors, or a dict of
    keyword tensors, the way the model is called."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (), dict(batch)

"""Calling a captured graph like the original module.

torch.export fixes the call layout it saw (which arguments were positional, which keywords). Users call
the optimized model the way they call their model, so arguments are bound to the original ``forward``
signature and re-laid out for the graph, with an error that names any argument the graph cannot take.
"""
from __future__ import annotations

import inspect
from typing import Any

from dynasparse.errors import DynasparseError


class CallLayout:
    """The original signature plus the positional/keyword layout the graph was captured with."""

    def __init__(self, forward, example_args: tuple, example_kwargs: dict[str, Any]):
        self.signature = inspect.signature(forward)
        bound = self.signature.bind(*example_args, **example_kwargs)
        self.captured = [name for name in bound.arguments]
        self.num_positional = len(example_args)

    def arrange(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            raise DynasparseError(f"cannot call the optimized model this way: {err}") from None
        given = dict(bound.arguments)
        missing = [n for n in self.captured if n not in given]
        extra = [n for n, v in given.items() if n not in self.captured
                 and v is not self.signature.parameters[n].default and v is not None]
        if missing or extra:
            raise DynasparseError(
                f"inputs do not match the captured model: it was captured with ({', '.join(self.captured)})"
                + (f"; missing {missing}" if missing else "") + (f"; not captured {extra}" if extra else "")
                + ". Call it with the same arguments as the example inputs given to optimize(), or "
                "optimize again with example inputs that include them.")
        names = self.captured
        return (tuple(given[n] for n in names[:self.num_positional]),
                {n: given[n] for n in names[self.num_positional:]})

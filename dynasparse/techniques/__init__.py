"""The technique records, one module each (``<name>.py``, a ``Technique`` subclass with ``@register``).

Importing this package (``dynasparse`` does, on import) imports every record in it, so each registers
itself with ``dynasparse.registry``; a new record needs no line here.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

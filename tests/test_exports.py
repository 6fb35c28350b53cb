import importlib
import pkgutil

import zmqmodels


def test_every_module_declares_all_and_package_reexports_public_names() -> None:
    for info in pkgutil.iter_modules(zmqmodels.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"zmqmodels.{info.name}")
        assert hasattr(mod, "__all__"), f"zmqmodels.{info.name} has no __all__"
        for name in mod.__all__:
            assert hasattr(mod, name), f"zmqmodels.{info.name}.__all__ names missing {name}"
    for name in zmqmodels.__all__:
        assert hasattr(zmqmodels, name)

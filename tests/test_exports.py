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


def test_hub_and_subscriber_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, zmqmodels, zmqmodels.hub, zmqmodels.subscriber, zmqmodels.control, "
            "zmqmodels.cli, zmqmodels.store; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr

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

    code = ("import sys, zmqmodels, zmqmodels.hub, zmqmodels.subscriber, zmqmodels.hub_client, "
            "zmqmodels.node, zmqmodels.embedded, zmqmodels.cli, zmqmodels.store; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


CORES = ("broker", "rollout", "supervisor", "assembly", "fleet", "forward", "waves")


def test_cores_do_no_io() -> None:
    """The deciding code takes events and time and returns actions: no zmq, torch, threads or
    processes, so a unit test reaches every branch."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    for core in CORES:
        text = (pkg / f"{core}.py").read_text()
        assert not re.search(r"^\s*(import|from) (zmq|torch|threading|subprocess|socket)\b", text, re.M), core
    code = (f"import sys; import {', '.join('zmqmodels.' + c for c in CORES)}; "
            "print('zmq' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_only_the_cli_package_imports_click() -> None:
    import re
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    users = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
             if re.search(r"^\s*import click|^\s*from click", p.read_text(), re.M)]
    assert users and all(u.startswith("cli/") for u in users), users

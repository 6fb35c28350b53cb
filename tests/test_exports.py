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

    code = ("import sys, zmqmodels, zmqmodels.hub, zmqmodels.follower, zmqmodels.hub_client, "
            "zmqmodels.node, zmqmodels.embedded, zmqmodels.cli, zmqmodels.store; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def _cores() -> list[str]:
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent / "core"
    return sorted(p.stem for p in pkg.glob("*.py") if p.stem != "__init__")


def test_cores_live_in_the_core_package_and_do_no_io() -> None:
    """The deciding code takes events and time and returns actions: no zmq, torch, threads or
    processes, so a unit test reaches every branch. The file tree says which modules those are:
    every sans-I/O class is under ``zmqmodels/core/``, every shell outside it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    cores = _cores()
    assert {"intake", "serve", "hub", "assembly", "forward", "waves", "fleet", "broker", "swap",
            "supervisor"} <= set(cores), cores
    pkg = Path(zmqmodels.__file__).parent
    for core in cores:
        text = (pkg / "core" / f"{core}.py").read_text()
        assert not re.search(r"^\s*(import|from) (zmq|torch|threading|subprocess|socket)\b", text, re.M), core
    code = (f"import sys; import {', '.join('zmqmodels.core.' + c for c in cores)}; "
            "print('zmq' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
    for shell in SHELLS:
        text = (pkg / f"{shell}.py").read_text()
        assert re.search(r"^\s*(import|from) (zmq|\.ioloop|\.mailbox)\b", text, re.M), shell


def test_only_the_cli_package_imports_click() -> None:
    import re
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    users = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
             if re.search(r"^\s*import click|^\s*from click", p.read_text(), re.M)]
    assert users and all(u.startswith("cli/") for u in users), users


def _import_graph() -> dict[str, set[str]]:
    """zmqmodels module -> the zmqmodels modules it imports, anywhere in it (a lazy import in a
    function is still a dependency)."""
    import ast
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).with_suffix("").parts
        name = ".".join(("zmqmodels", *rel)).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(0, node.level - 1)):
                    base = base.rsplit(".", 1)[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                for alias in node.names:  # `from . import protocol` imports a module
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if (pkg.parent / (sub.replace(".", "/") + ".py")).exists() else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("zmqmodels") and d != name}
    return graph


def test_the_package_has_no_import_circle() -> None:
    """There were two (subscriber <-> embedded through a compatibility alias, protocol <-> fleet)."""
    graph = _import_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for d in sorted(graph.get(m, ())):
            if d == "zmqmodels" or d not in graph:
                continue  # the package's lazy re-exports are names, not a dependency
            assert seen.get(d) != 1, " -> ".join([*path, m, d])
            if d not in seen:
                visit(d, [*path, m])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [])


SHELLS = ("hub", "relay", "node", "embedded", "worker", "follower")


def test_no_shell_reaches_into_another_for_its_helpers() -> None:
    """The relay imported `bind_hub_sockets` from the hub shell. Shells compose the Follower (the
    intake shell) and nothing else of each other."""
    graph = _import_graph()
    for shell in SHELLS:
        others = {f"zmqmodels.{s}" for s in SHELLS if s != shell} - {"zmqmodels.follower"}
        assert not graph[f"zmqmodels.{shell}"] & others, (shell, graph[f"zmqmodels.{shell}"] & others)


def test_no_module_over_450_lines_and_the_hub_class_at_most_250() -> None:
    """Before: hub 625 lines (its class 554), protocol 610, node 534, assembly 502."""
    import ast
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    sizes = {p.relative_to(pkg).as_posix(): len(p.read_text().splitlines()) for p in pkg.rglob("*.py")}
    assert not {m: n for m, n in sizes.items() if n > 450}, sizes
    tree = ast.parse((pkg / "hub.py").read_text())
    (hub,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hub"]
    assert hub.end_lineno - hub.lineno + 1 <= 250


def test_states_are_enums_on_the_wire_and_no_shell_compares_state_strings() -> None:
    """Before: Report.state, NodeStatus.state and WaveStatus.state were str, Broker.report()
    returned "loading"/"serving"/"idle", and about 20 state literals sat in node, broker, hub
    and cli; WorkerReady.serving was dict[str, list]."""
    import re
    import typing
    from pathlib import Path

    import msgspec

    from zmqmodels import protocol as P
    from zmqmodels.core.broker import Broker

    def field_type(struct: type, name: str) -> object:
        return typing.get_type_hints(struct)[name]

    assert field_type(P.Report, "state") is P.ModelState
    assert field_type(P.NodeStatus, "state") is P.ModelState
    assert field_type(P.WaveStatus, "state") is P.WaveState
    assert field_type(P.WorkerReady, "serving") == dict[str, P.Held]
    assert isinstance(Broker(["m"], ["w"], path_for=lambda n, s: "").report("m")[0], P.ModelState)
    with __import__("pytest").raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"node": "n", "model": "m", "state": "dancing"}),
                               type=P.Report)
    words = "receiving|verified|loading|loaded|serving|rejected|idle|lost|running|done|halted"
    literal = re.compile(rf'(==|!=|\bin \(|\bin \[)\s*"({words})"')
    pkg = Path(zmqmodels.__file__).parent
    found = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if p.parent.name != "protocol"
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []


def test_the_wave_plan_is_one_record_from_the_cli_to_the_wire() -> None:
    """Before: a CLI dict, waves.plan()'s dict, the Publish struct's four fields, and
    HubClient.publish and Hub.publish keywords."""
    import inspect
    import typing

    from zmqmodels import protocol as P
    from zmqmodels.hub import Hub
    from zmqmodels.hub_client import HubClient

    assert typing.get_type_hints(P.Publish)["plan"] == P.WavePlan | None
    assert not {"waves", "wave_wait_s", "halt_on", "confirm_s"} & set(P.Publish.__struct_fields__)
    for publish in (Hub.publish, HubClient.publish):
        params = inspect.signature(publish).parameters
        assert "plan" in params and not {"waves", "wave_wait_s", "halt_on", "confirm_s"} & set(params)


def test_one_meaning_per_word_and_one_tally() -> None:
    """Before: "rollout" named the node's swap policy module, the hub's waves and the
    --wait-for tally, which was written four times."""
    import importlib.util
    import inspect

    from zmqmodels.core import fleet, swap
    from zmqmodels.hub_client import HubClient

    assert importlib.util.find_spec("zmqmodels.rollout") is None and hasattr(swap, "Swaps")
    assert not hasattr(fleet, "rollout") and hasattr(fleet, "tally")
    from zmqmodels.cli import publishing

    for fn in (publishing.wait_with_progress, HubClient.wait_for, HubClient.wait_rollout,
               publishing.watch_waves):
        src = inspect.getsource(fn)
        assert "n.state" not in src and "r.state" not in src, fn  # no tally of its own
        assert any(rule in src for rule in ("tally(", "wait_for(", "wait_rollout(")), fn

import importlib
import pkgutil

import zmqmodels


def test_every_module_declares_all_and_package_reexports_public_names() -> None:
    for info in pkgutil.walk_packages(zmqmodels.__path__, "zmqmodels."):
        if info.name.rsplit(".", 1)[-1].startswith("_") or info.name == "zmqmodels.oip.pb":
            continue  # oip.pb: generated gRPC messages
        mod = importlib.import_module(info.name)
        assert hasattr(mod, "__all__"), f"{info.name} has no __all__"
        for name in mod.__all__:
            assert hasattr(mod, name), f"{info.name}.__all__ names missing {name}"
    for name in zmqmodels.__all__:
        assert hasattr(zmqmodels, name)


TORCH_FREE = ["zmqmodels.hub.hub", "zmqmodels.hub.relay", "zmqmodels.node.node", "zmqmodels.node.follower",
              "zmqmodels.node.embedded", "zmqmodels.clients.client", "zmqmodels.clients.aclient",
              "zmqmodels.clients.hub", "zmqmodels.oip.gateway", "zmqmodels.cli", "zmqmodels.release.store",
              "zmqmodels.release.cache", "zmqmodels.transport.metrics"]


def test_the_hub_relay_node_front_gateway_and_clients_import_no_torch() -> None:
    import subprocess
    import sys

    code = f"import sys, {', '.join(TORCH_FREE)}; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# Layers, bottom first: a package imports only from its own layer's package or below. Siblings in
# one layer (core and model; hub, node and clients) do not import each other.
LAYERS = [["errors", "defaults"], ["protocol"], ["release"], ["core"], ["model"], ["transport"],
          ["hub", "node", "clients"], ["oip"], ["cli"]]
TORCH_HOMES = ("zmqmodels.model.", "zmqmodels.node.worker", "zmqmodels.node.holdings",
               "zmqmodels.node.embedded")
"""Where a model runs: the model package, a node's worker processes and the subscriber embedded in
a caller's process."""


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_downward() -> None:
    """Every import, lazy ones too, goes to a lower layer (or its own package)."""
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    graph = _import_graph()
    assert set(rank) >= {_package(m) for m in graph if m != "zmqmodels" and _package(m) != "__main__"}
    wrong = []
    for m, deps in graph.items():
        src = _package(m)
        if src in ("", "__main__"):
            continue
        for d in deps:
            dst = _package(d)
            if dst and dst != src and not rank[dst] < rank[src]:
                wrong.append(f"{m} -> {d}")
    assert wrong == []


def test_torch_is_imported_only_where_a_model_runs() -> None:
    """Anywhere in a module, lazily or not. protocol/tensors may import it inside a function only,
    to hand torch tensors to a caller that works in torch (its arrays are numpy's)."""
    import ast
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    found = {}
    for path in pkg.rglob("*.py"):
        name = ".".join(("zmqmodels", *path.relative_to(pkg).with_suffix("").parts))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(m == "torch" or m.startswith("torch.") for m in mods):
                found.setdefault(name, []).append(node in tree.body)
    allowed = {m for m in found if m.startswith(TORCH_HOMES)}
    assert set(found) - allowed == {"zmqmodels.protocol.tensors"}, sorted(set(found) - allowed)
    assert not any(found["zmqmodels.protocol.tensors"]), "protocol/tensors imports torch at its top"


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
        text = (pkg / f"{shell.replace('.', '/')}.py").read_text()
        assert re.search(r"^\s*(import|from) (zmq|\.\.transport\.ioloop|\.\.transport\.mailbox)\b", text,
                         re.M), shell


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
                    where = pkg.parent / sub.replace(".", "/")
                    deps.add(sub if where.with_suffix(".py").exists() or (where / "__init__.py").exists()
                             else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("zmqmodels") and d != name}
    return graph


def test_the_package_has_no_import_circle() -> None:
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


SHELLS = ("hub.hub", "hub.relay", "node.node", "node.embedded", "node.worker", "node.follower")


def test_no_shell_reaches_into_another_for_its_helpers() -> None:
    """Shells compose the Follower (the intake shell) and nothing else of each other; none
    reaches into another's core state, and store jobs and probes see their hub or node through
    a named Protocol."""
    import re
    from pathlib import Path

    graph = _import_graph()
    for shell in SHELLS:
        others = {f"zmqmodels.{s}" for s in SHELLS if s != shell} - {"zmqmodels.node.follower"}
        assert not graph[f"zmqmodels.{shell}"] & others, (shell, graph[f"zmqmodels.{shell}"] & others)
    # the worker process reads requests with the protocol's parser, not its front's module
    assert not graph["zmqmodels.node.worker"] & {"zmqmodels.node.requests", "zmqmodels.node.node"}
    pkg = Path(zmqmodels.__file__).parent
    reach = re.compile(r"\.(follower|_sub)\.assembler\.|\bnode\._[a-z]")
    found = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if reach.search(line)]
    assert found == []
    for path, seam in (("hub/jobs.py", "def __init__(self, hub: JobsHost)"),
                       ("transport/health.py", "def node_health(node: NodeView)")):
        assert seam in (pkg / path).read_text(), path


def test_states_are_enums_on_the_wire_and_no_shell_compares_state_strings() -> None:
    """States are enums on the wire and in the broker; no shell compares state strings."""
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
    """The wave plan is one record from the CLI to the wire."""
    import inspect
    import typing

    from zmqmodels import protocol as P
    from zmqmodels.clients.hub import HubClient
    from zmqmodels.hub.hub import Hub

    assert typing.get_type_hints(P.Publish)["plan"] == P.WavePlan | None
    assert not {"waves", "wave_wait_s", "halt_on", "confirm_s"} & set(P.Publish.__struct_fields__)
    for publish in (Hub.publish, HubClient.publish):
        params = inspect.signature(publish).parameters
        assert "plan" in params and not {"waves", "wave_wait_s", "halt_on", "confirm_s"} & set(params)


def test_one_meaning_per_word_and_one_tally() -> None:
    """One meaning per word (swaps, waves, the tally) and one tally for every wait."""
    import importlib.util
    import inspect

    from zmqmodels.clients.hub import HubClient
    from zmqmodels.core import fleet, swap

    assert importlib.util.find_spec("zmqmodels.rollout") is None and hasattr(swap, "Swaps")
    assert not hasattr(fleet, "rollout") and hasattr(fleet, "tally")
    from zmqmodels.cli import publishing

    for fn in (publishing.wait_with_progress, HubClient.wait_for, HubClient.wait_rollout,
               publishing.watch_waves):
        src = inspect.getsource(fn)
        assert "n.state" not in src and "r.state" not in src, fn  # no tally of its own
        assert any(rule in src for rule in ("tally(", "wait_for(", "wait_rollout(")), fn


def test_no_class_over_300_lines_and_no_function_body_over_60() -> None:
    """Concepts are split, not squeezed under a file cap: a class holds one concept, a function
    one step (its body counted from its first statement: a constructor's options are not steps)."""
    import ast
    from pathlib import Path

    pkg = Path(zmqmodels.__file__).parent
    big = []
    for path in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                big.append(f"{path.relative_to(pkg)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > 60:
                    big.append(f"{path.relative_to(pkg)}:{node.name} (a {body}-line body)")
    assert big == []

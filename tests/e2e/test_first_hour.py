"""What a new user met in the first hour, each as it was seen: a suite that failed on a busy
machine, a CLI that imported torch to print a table, sharp edges in the first commands."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import alive, free_port, stop_and_expect_gone, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Hub, Node, Relay, build_release, compile_model
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def poisoned(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import torch` fails loudly: what runs there provably does
    without torch (a fake package first on the path, the way a missing install would look)."""
    fake = tmp_path / "poison" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was imported by a torch-free command')\n")
    return {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zmqmodels", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or {**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def probe_release():
    return build_release(compile_model(Probe(2.0), probe_examples()), "probe", "a")


# -- a fast, torch-free CLI where no model runs ------------------------------------------------------
def test_the_hub_and_the_commands_that_run_no_model_never_import_torch(tmp_path, probe_release) -> None:
    """torch cannot be imported here at all: the hub, status, releases, inspect, publish of a
    built release, activate, rollback and infer work regardless (and start in a fraction of a second)."""
    env = poisoned(tmp_path)
    store = Store(tmp_path / "built")
    built = store.path("probe", store.put(probe_release).release.manifest.seq)
    port = free_port()
    hub = subprocess.Popen([sys.executable, "-m", "zmqmodels", "hub", "--bind", f"tcp://127.0.0.1:{port}",
                            "--store", str(tmp_path / "hub")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    addr = f"tcp://127.0.0.1:{port}"
    node = None
    try:
        wait_until(lambda: cli("status", "--hub", addr, "--timeout", "1", env=env).returncode == 0, 60,
                   what="the torch-free hub answering")
        node = Node(addr, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "cache",
                    node_id="n1").start()
        out = cli("publish", str(built), "--hub", addr, "--wait-for", "1", "--json", env=env)
        assert out.returncode == 0, out.stderr
        done = json.loads(out.stdout)
        assert done["ok"] and done["serving"] == 1
        assert set(done["timings"]) >= {"cli_import", "read", "send", "hub_store", "broadcast", "wait"}
        seq = done["seq"]
        out = cli("infer", "--server", node.address, "--model", "probe", "--input", "1x4", "--json", env=env)
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["seq"] == seq and reply["outputs"]["shape"] == [1, 4]
        assert cli("status", "--hub", addr, env=env).stdout.count("serving") == 1
        assert cli("releases", "probe", "--hub", addr, env=env).returncode == 0
        out = cli("inspect", str(built), env=env)
        assert out.returncode == 0 and "total: 4 parameters" in out.stdout, out.stdout + out.stderr
        out = cli("activate", "probe", "--seq", str(seq), "--hub", addr, env=env)
        assert out.returncode == 1 and "not published staged" in out.stderr  # refused, not a crash
        out = cli("rollback", "probe", "--to", str(seq), "--hub", addr, "--wait-for", "1", env=env)
        assert out.returncode == 0, out.stderr
    finally:
        if node is not None:
            node.close()
        hub.send_signal(signal.SIGTERM)
        _, err = hub.communicate(timeout=30)
    assert hub.returncode == 0 and "torch was imported" not in err, err


def test_publish_json_breaks_the_time_down_by_step(tmp_path) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub")) as hub:
        out = cli("publish", "tests.models:make_probe", "--name", "probe", "--hub", hub.address, "--json",
                  timeout=120)
    assert out.returncode == 0, out.stderr
    t = json.loads(out.stdout)["timings"]
    for step in ("import", "load", "compile", "parity", "build", "compress", "send", "hub_store",
                 "broadcast", "wait", "total"):
        assert step in t and t[step] >= 0, (step, t)
    assert t["total"] >= t["compile"] + t["parity"]


def test_a_built_release_is_refused_with_compile_options(tmp_path, probe_release) -> None:
    store = Store(tmp_path / "built")
    built = store.path("probe", store.put(probe_release).release.manifest.seq)
    out = cli("publish", str(built), "--hub", "tcp://127.0.0.1:1", "--example-input", "1x4")
    assert out.returncode == 1 and "--example-input:" in out.stderr and "built release" in out.stderr
    out = cli("publish", str(built), "--hub", "tcp://127.0.0.1:1", "--name", "other")
    assert out.returncode == 1 and "is a release of 'probe'" in out.stderr


# -- friction in the first minutes ---------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["status", "--hub", "127.0.0.1:21000"], "has no scheme: did you mean tcp://127.0.0.1:21000?"),
    (["status", "--hub", "tcp://no-such-host.invalid:5"], "does not resolve"),
    (["serve", "--model", "m", "--bind", "tcp://127.0.0.1:0", "--trust", "/no/such/key.pub"],
     "does not exist"),
    (["publish", "x.py:f", "--name", "bad name", "--hub", "tcp://127.0.0.1:1"], "invalid model name"),
])
def test_bad_arguments_are_one_line_and_rc_1(args, needle) -> None:
    """A bad `--hub`, a missing `--trust` file or an invalid `--name` is one line and rc 1,
    before anything is compiled."""
    t0 = time.monotonic()
    out = cli(*args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert needle in lines[0]
    assert "compiling" not in out.stdout and time.monotonic() - t0 < 30


def test_infer_says_each_attempt_as_it_happens() -> None:
    """`infer` to a port nothing listens on says each attempt as it happens (each refused at
    once: tests/e2e/test_clients.py)."""
    out = cli("infer", "--server", f"tcp://127.0.0.1:{free_port()}", "--model", "m", "--input", "1x4",
              "--timeout", "0.3", "--retries", "2")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("attempt 1 of 3: connection refused"), lines
    assert lines[1].startswith("attempt 2 of 3: connection refused"), lines
    assert lines[-1].startswith("error: connection refused") and len(lines) == 3, lines


def test_a_closed_pipe_is_no_traceback(tmp_path) -> None:
    """`zmqmodels infer ... | head -1` ends quietly."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub")) as hub:
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-m", "zmqmodels", "status", "--hub", hub.address],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert p.stdout is not None
            p.stdout.close()  # the reader is gone before the table is written
            _, err = p.communicate(timeout=60)
            assert "Traceback" not in err and "BrokenPipeError" not in err, err
            assert p.returncode != 0  # it could not say what it was asked


def test_ctrl_c_ends_status_watch_with_0(tmp_path) -> None:
    """Ctrl-C ends `status --watch` with rc 0: the operator asked it to stop."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub")) as hub:
        p = subprocess.Popen([sys.executable, "-m", "zmqmodels", "status", "--watch", "--interval", "0.2",
                              "--hub", hub.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.stdout is not None
        p.stdout.readline()  # it is drawing
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err


def test_a_staged_publish_does_not_end_with_serving_on_0_nodes(tmp_path) -> None:
    """A staged publish ends by saying the nodes cache it and serve it once activated."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub")) as hub:
        out = cli("publish", "tests.models:make_probe", "--name", "probe", "--hub", hub.address,
                  "--staged", timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("ok: probe seq 1 staged:") and "served once activated" in last, out.stdout


def test_relay_has_metrics(tmp_path, probe_release) -> None:
    """The relay has `--metrics`, as the hub and the node do."""
    port = free_port()
    assert "--metrics" in cli("relay", "--help").stdout
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub")) as hub, \
            Relay(hub.address, "tcp://127.0.0.1:0", tmp_path / "relay", ["probe"],
                  metrics=f"127.0.0.1:{port}") as relay:
        hub.publish(probe_release)
        wait_until(lambda: relay.metrics_view()["held"].get("probe") == 1, 30, what="the relay holding seq 1")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'zmqmodels_relay_latest_seq{model="probe"} 1.0' in text
    assert 'zmqmodels_relay_chunks_total{how="broadcast"}' in text
    assert "zmqmodels_relay_releases_total 1.0" in text


def test_a_killed_nodes_run_directory_is_removed_by_the_next_one(tmp_path) -> None:
    """A node killed with kill -9 leaves its `zmqm-node-*` directory; the next node removes it."""
    code = ("import sys, time; from zmqmodels.node.host import make_run_dir; "
            "d, _ = make_run_dir(sys.argv[1]); print(d, flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env)
    alive = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert killed.stdout is not None and alive.stdout is not None
        dead_dir, live_dir = Path(killed.stdout.readline().strip()), Path(alive.stdout.readline().strip())
        killed.kill()
        killed.wait(10)
        assert dead_dir.is_dir()
        from zmqmodels.node.host import make_run_dir

        mine, lock = make_run_dir(str(tmp_path))
        lock.close()
        assert not dead_dir.exists() and live_dir.is_dir() and Path(mine).is_dir()
    finally:
        alive.kill()
        alive.wait(10)
        for p in (killed, alive):
            assert p.stdout is not None
            p.stdout.close()


def test_readme_says_how_to_get_the_command_and_quotes_shell_metacharacters() -> None:
    """The README says how to get the `zmqmodels` command and quotes what a shell would expand."""
    text = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in text and "pip install" in text
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for line in doc.read_text().splitlines():
            if "error-rate>" in line and "--halt-on" in line:
                assert "--halt-on 'error-rate>" in line or '--halt-on "error-rate>' in line, (doc, line)


def test_venv_setup_says_what_it_is_doing(tmp_path) -> None:
    """Setting up .venv announces each step, in order. Here with a stand-in python, so no install
    runs."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "_venv.sh").write_text((ROOT / "scripts" / "_venv.sh").read_text())
    (tmp_path / "pyproject.toml").write_text("")
    fake = tmp_path / "fakepython"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # a python that 'creates' a venv whose python has no torch until pip 'installs' it
        if [ "$1" = -m ] && [ "$2" = venv ]; then
            mkdir -p "$3/bin"; cp "{tmp_path}/fakepython" "$3/bin/python"; exit 0
        fi
        if [ "$1" = -c ]; then [ -f "{tmp_path}/torch-installed" ]; exit $?; fi
        if [ "$1" = -m ] && [ "$2" = pip ]; then
            case "$*" in *torch==*) touch "{tmp_path}/torch-installed";; esac; exit 0
        fi
        exit 0
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(["bash", "-c", f"PYTHON={fake} source {tmp_path}/scripts/_venv.sh"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stderr.splitlines() if "setting up" in line]
    assert [s.split("(")[1][:3] for s in steps] == ["1/3", "2/3", "3/3"], out.stderr
    assert "source .venv/bin/activate" in out.stderr


# -- a suite that passes on a fresh, busy machine ---------------------------------------------------
def _fake_tools(tmp_path: Path) -> Path:
    """Stand-ins for cmake (a long build whose 'compiler' records its pid) and dpkg-query
    (everything installed), put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cmake").write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [ "$1" = --build ]; then
            sleep 300 &
            echo $! > "{tmp_path}/compiler.pid"
            wait
        fi
        """))
    (bin_dir / "dpkg-query").write_text("#!/usr/bin/env bash\necho 'install ok installed'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_a_stopped_build_stops_its_compilers(tmp_path) -> None:
    """A stopped `scripts/build_cpp` stops its compilers too."""
    env = {**os.environ, "PATH": f"{_fake_tools(tmp_path)}{os.pathsep}{os.environ['PATH']}"}
    build = subprocess.Popen([str(ROOT / "scripts" / "build_cpp")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    pid_file = tmp_path / "compiler.pid"
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 120, what="a compile")
        stop_and_expect_gone(build, lambda: build.send_signal(signal.SIGTERM), int(pid_file.read_text()),
                             "the compiler to stop with the build")
    finally:
        if build.poll() is None:
            build.kill()
            build.wait(10)
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_scripts_test_builds_the_cpp_node_before_pytest_never_inside_a_test(tmp_path) -> None:
    """scripts/test runs scripts/build_cpp, then pytest, in that order: no build runs under a
    test's timeout. Here with stand-ins."""
    (tmp_path / "scripts").mkdir()
    log = tmp_path / "calls"
    for name in ("test", "_venv.sh"):
        (tmp_path / "scripts" / name).write_text((ROOT / "scripts" / name).read_text())
    (tmp_path / "scripts" / "test").chmod(0o755)
    (tmp_path / "scripts" / "build_cpp").write_text(f"#!/usr/bin/env bash\necho build_cpp >> {log}\n")
    (tmp_path / "scripts" / "build_cpp").chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && exit 0\necho "$*" >> {log}\n')
    (venv_bin / "python").chmod(0o755)
    (tmp_path / ".venv" / ".zmqmodels-installed").touch()
    (tmp_path / ".venv-base").mkdir()  # the base install, made already
    (tmp_path / ".venv-base" / ".zmqmodels-installed").touch()
    out = subprocess.run([str(tmp_path / "scripts" / "test"), "-q"], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "ZMQM_SKIP_CPP"})
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == ["build_cpp", "-m pytest -q"]
    assert "building the C++ node" in out.stderr
    from tests import helpers

    missing = tmp_path / "no-binary"
    saved, helpers.BINARY = helpers.BINARY, missing
    try:
        assert helpers.built_binary() is None  # the fixture skips; it never builds
    finally:
        helpers.BINARY = saved


def test_hub_relay_node_front_and_client_modules_import_no_torch(tmp_path) -> None:
    """What each role needs, as the README says it: only compiling and the node's workers
    import torch."""
    code = ("import sys; import zmqmodels.hub.hub, zmqmodels.hub.relay, zmqmodels.node.node, "
            "zmqmodels.clients.client, zmqmodels.clients.hub, zmqmodels.release.archive, "
            "zmqmodels.cli.fleet, zmqmodels.cli.serving, "
            "zmqmodels.cli.release; assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], env=poisoned(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr

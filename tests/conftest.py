import subprocess
import sys

import pytest

from tests.harness import Net


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def make_net(tmp_path, request):
    """Build a network; every agent it started is stopped at the end; logs shown on failure."""
    nets: list[Net] = []

    def make(names, edges, settings=None, start=True) -> Net:
        net = Net(tmp_path / f"net{len(nets)}", names, edges, settings)
        nets.append(net)
        if start:
            net.start()
        return net

    yield make
    for net in nets:
        net.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for net in nets:
            print(net.logs())


@pytest.fixture
def node(tmp_path):
    """A node made by ``maildrop init`` as an operator would (root 0750, nothing running);
    returns its config file."""
    root = tmp_path / "a"
    cp = subprocess.run([sys.executable, "-m", "maildrop", "init", str(root), "--id", "NodeA",
                         "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=90)
    assert cp.returncode == 0, cp.stderr
    root.chmod(0o750)
    return root / "maildrop.yaml"

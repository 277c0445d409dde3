"""Two hosts made of network namespaces (a veth pair, own hostnames through `unshare --uts`, names in /etc/hosts,
restored afterwards): a real rendezvous over a non-loopback address, the way two machines do it. One host's
launcher and worker are killed mid-run and started again (what Kubernetes or a supervisor does); without the
relaunch, the surviving launcher stops within launcher.join_timeout_s naming the missing host. Needs root; cluster
stage of CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import DISTRAIN
from test_recovery import (
    RUN,
    assert_matches,
    kill_and_relaunch,
    kill_and_wait_for_the_survivor,
    same_weights,
    steps_logged,
    uninterrupted,
    wait_for,
)

pytestmark = pytest.mark.cluster
__all__ = ["uninterrupted"]  # the fixture, shared with test_recovery.py
HOSTS = {"dtrn-host1": ("dtrn1", "10.213.0.1"), "dtrn-host2": ("dtrn2", "10.213.0.2")}  # host: (namespace, address)
ENDPOINT = "dtrn-host1:29513"


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("network namespaces need root, ip and unshare")
    etc_hosts = Path("/etc/hosts")
    saved = etc_hosts.read_text()
    (ns1, ip1), (ns2, ip2) = HOSTS.values()
    commands = [
        f"ip netns add {ns1}", f"ip netns add {ns2}", "ip link add dtrn-veth1 type veth peer name dtrn-veth2",
        f"ip link set dtrn-veth1 netns {ns1}", f"ip link set dtrn-veth2 netns {ns2}",
        f"ip -n {ns1} addr add {ip1}/24 dev dtrn-veth1", f"ip -n {ns2} addr add {ip2}/24 dev dtrn-veth2",
        f"ip -n {ns1} link set dtrn-veth1 up", f"ip -n {ns2} link set dtrn-veth2 up",
        f"ip -n {ns1} link set lo up", f"ip -n {ns2} link set lo up",
    ]  # fmt: skip
    try:
        for command in commands:
            subprocess.run(command.split(), check=True)
        etc_hosts.write_text(saved + "".join(f"{ip} {host}\n" for host, (_, ip) in HOSTS.items()))
        yield
    finally:
        etc_hosts.write_text(saved)
        for namespace, _ in HOSTS.values():
            subprocess.run(["ip", "netns", "del", namespace], check=False)


def launch_on(host: str, run: Path, cache_dir: str, *extra: str) -> subprocess.Popen:
    """`distrain train` as host `host` would run it: in its network namespace, under its own hostname."""
    namespace, _ = HOSTS[host]
    multi = ["launcher.nnodes=2", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={ENDPOINT}",
             "launcher.threads_per_process=1", "launcher.max_restarts=1", *extra]  # fmt: skip
    command = [DISTRAIN, "train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}", *multi]
    # ip netns exec, unshare and sh all exec: the process is the launcher itself.
    wrapper = ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh"]
    return subprocess.Popen([*wrapper, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def test_a_killed_host_that_is_relaunched_rejoins_and_ends_as_if_nothing_happened(
    hosts, uninterrupted, tmp_path, cache_dir
):
    run = tmp_path / "two-hosts"
    first = launch_on("dtrn-host1", run, cache_dir)
    second = launch_on("dtrn-host2", run, cache_dir)
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25", first, timeout=300)
    assert "on dtrn-host2" in (run / "logs" / "rank_1.log").read_text() + (run / "logs" / "rank_0.log").read_text()
    relaunch = lambda: launch_on("dtrn-host2", run, cache_dir)  # noqa: E731
    reformed, resumed = kill_and_relaunch(run, first, second, relaunch, wait_s=300, end_s=600)
    print(f"two namespace hosts: re-formed {reformed:.1f} s after the relaunch, resumed from step {resumed}, "
          f"final weights vs uninterrupted: max |diff| {same_weights(run, uninterrupted):.3g}")  # fmt: skip
    assert_matches(run, uninterrupted)


def test_a_killed_host_not_relaunched_is_named_by_the_survivor_in_bounded_time(hosts, tmp_path, cache_dir):
    run = tmp_path / "lost-host"
    first = launch_on("dtrn-host1", run, cache_dir, "launcher.join_timeout_s=20")
    second = launch_on("dtrn-host2", run, cache_dir, "launcher.join_timeout_s=20")
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25", first, timeout=300)
    output, seconds = kill_and_wait_for_the_survivor(run, first, second)
    print(f"host2 killed, not relaunched: host1's launcher stopped after {seconds:.1f} s:\n{output[-900:]}")
    assert first.returncode == 1
    assert "Missing: the other hosts of the last group (dtrn-host2); this host is dtrn-host1" in output
    assert seconds < 20 + 60

"""Data-parallel training across a slow link: two hosts made of network namespaces joined by a veth pair whose
bandwidth `tc` limits (a tbf qdisc on each end; this kernel has no netem), one `distrain train` launcher per host
(launcher.nnodes=2, one process each, as tests/test_multinode.py forms its group), one run per communication mode:

    every_step   DDP, every fp32 gradient all-reduced at every step (parallel.sparse_embedding_grads=false)
    sparse_rows  the same, but of the word embedding only the rows some rank's batch touched (distrain's default)
    fp16         DDP with the fp16 compression hook (the embedding's touched rows apart, as in sparse_rows)
    powersgd     DDP with PowerSGD (rank 4, after 2 plain steps; the embedding's rows apart too)
    local_sgd    weights averaged every H steps
    diloco       outer Nesterov step on the averaged change every H steps

Each mode trains MiniLM on WNUT-16 NER (micro-batch 8 per process) for the same steps, so the same samples; the
table gives wall time per step (mean over the steps after the first), bytes each process put into all-reduces
per step (the train records' comm_bytes_per_step), the last train loss (mean of the last 5 steps) and the dev loss,
F1 and token accuracy at the end. Needs root (ip netns, tc, unshare).

    sudo .venv/bin/python scripts/slow_link_bench.py --out /tmp/slow-link --steps 40 --every 8
    sudo .venv/bin/python scripts/slow_link_bench.py --out /tmp/slow-link --smoke   # tiny BERT, 4 steps: a smoke
    sudo .venv/bin/python scripts/slow_link_bench.py --out /tmp/r16 --modes powersgd parallel.powersgd.rank=16

Only traffic between the two namespaces it creates (10.214.0.1/2, removed at the end; /etc/hosts restored).
Results: <out>/slow_link.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DISTRAIN = str(Path(sys.executable).parent / "distrain")
HOSTS = {"dsl-host1": ("dsl1", "10.214.0.1", "dsl-veth1"), "dsl-host2": ("dsl2", "10.214.0.2", "dsl-veth2")}
ENDPOINT = "dsl-host1:29514"
MODES = {
    "every_step": ["parallel.sparse_embedding_grads=false"],
    "sparse_rows": [],
    "fp16": ["parallel.comm_hook=fp16"],
    "powersgd": ["parallel.comm_hook=powersgd", "parallel.powersgd.rank=4", "parallel.powersgd.start_step=2"],
    "local_sgd": ["parallel.sync=local_sgd"],
    "diloco": ["parallel.sync=diloco"],
}


def setup(rate: str) -> str:
    """The two namespace hosts and the limited link; returns /etc/hosts as it was."""
    etc_hosts = Path("/etc/hosts")
    saved = etc_hosts.read_text()
    (ns1, ip1, veth1), (ns2, ip2, veth2) = HOSTS.values()
    commands = [
        f"ip netns add {ns1}", f"ip netns add {ns2}", f"ip link add {veth1} type veth peer name {veth2}",
        f"ip link set {veth1} netns {ns1}", f"ip link set {veth2} netns {ns2}",
        f"ip -n {ns1} addr add {ip1}/24 dev {veth1}", f"ip -n {ns2} addr add {ip2}/24 dev {veth2}",
        f"ip -n {ns1} link set {veth1} up", f"ip -n {ns2} link set {veth2} up",
        f"ip -n {ns1} link set lo up", f"ip -n {ns2} link set lo up",
        # each end shapes what it sends: the link is `rate` in both directions
        f"ip netns exec {ns1} tc qdisc add dev {veth1} root tbf rate {rate} burst 32kbit latency 400ms",
        f"ip netns exec {ns2} tc qdisc add dev {veth2} root tbf rate {rate} burst 32kbit latency 400ms",
    ]  # fmt: skip
    for command in commands:
        subprocess.run(command.split(), check=True)
    etc_hosts.write_text(saved + "".join(f"{ip} {host}\n" for host, (_, ip, _) in HOSTS.items()))
    return saved


def teardown(saved_hosts: str | None) -> None:
    if saved_hosts is not None:
        Path("/etc/hosts").write_text(saved_hosts)
    for namespace, _, _ in HOSTS.values():
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def launch(host: str, overrides: list[str], log: Path) -> subprocess.Popen:
    namespace, _, veth = HOSTS[host]
    multi = ["launcher.nnodes=2", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={ENDPOINT}",
             "launcher.threads_per_process=1"]  # fmt: skip
    wrapper = ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": veth}  # gloo's traffic goes over the limited link
    return subprocess.Popen([*wrapper, DISTRAIN, "train", *overrides, *multi], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip


def run_mode(mode: str, base: list[str], extra: list[str], out: Path, timeout: int) -> dict:
    run = out / mode
    shutil.rmtree(run, ignore_errors=True)
    given = {o.split("=", 1)[0] for o in extra}  # the command line's value of a key replaces the mode's
    overrides = [*base, *(o for o in MODES[mode] if o.split("=", 1)[0] not in given), *extra, f"run.dir={run}"]
    procs = [launch(host, overrides, out / f"{mode}.{host}.log") for host in HOSTS]
    codes = [p.wait(timeout=timeout) for p in procs]
    if any(codes):
        raise SystemExit(f"{mode}: launchers exited {codes}; see {out}/{mode}.*.log and {run}/logs")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    dev = [r for r in records if r["kind"] == "eval" and r.get("split") == "dev"][-1]
    times = [r["step_time_max"] for r in train[1:]] or [train[0]["step_time_max"]]  # step 1 pays start-up costs
    return {
        "mode": mode,
        "steps": train[-1]["step"],
        "seconds_per_step": statistics.mean(times),  # the mean: sync steps are 1 in H
        "bytes_per_step": statistics.mean(r["comm_bytes_per_step"] for r in train),
        "train_loss_last5": statistics.mean(r["loss"] for r in train[-5:]),
        "dev_loss": dev.get("loss"),
        "dev_f1": dev.get("f1"),
        "dev_accuracy": dev.get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=8, help="H of local_sgd and diloco")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 4 steps, H=2")
    parser.add_argument("overrides", nargs="*", help="distrain overrides for every mode (parallel.powersgd.rank=16)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("unshare"):
        raise SystemExit("needs root, ip, tc and unshare (network namespaces and a tbf qdisc)")
    steps, every = (4, 2) if args.smoke else (args.steps, args.every)
    # augmentation off: the same batches as the runs measured before wnut_ner turned it on
    model = ["+debug=tiny"] if args.smoke else ["+experiment=wnut_ner", "data.max_eval_samples=256", "data.augment=[]"]
    base = [*model, "parallel=ddp", "train.micro_batch_size=8", f"train.max_steps={steps}", "train.log_every=1",
            "train.eval_every=0", f"parallel.sync_every={every}", "data.cache_dir=" + str(args.out / "cache"),
            "optim.warmup_ratio=0"]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    saved = None
    rows = []
    try:
        teardown(None)  # leftovers of an interrupted run
        saved = setup(args.rate)
        for mode in args.modes.split(","):
            rows.append(run_mode(mode, base, args.overrides, args.out, timeout=600 + 30 * steps))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        teardown(saved)
    numbers = {"rate": args.rate, "steps": steps, "every": every, "overrides": args.overrides, "rows": rows}
    (args.out / "slow_link.json").write_text(json.dumps(numbers, indent=1))
    print(f"\n{'mode':<11} {'s/step':>8} {'MB/step':>9} {'train loss':>10} {'dev loss':>8} {'dev F1':>7} "
          f"{'dev acc':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['mode']:<11} {r['seconds_per_step']:>8.2f} {r['bytes_per_step'] / 1e6:>9.3f} "
              f"{r['train_loss_last5']:>10.4f} {r['dev_loss']:>8.4f} {r['dev_f1']:>7.3f} "
              f"{r['dev_accuracy']:>7.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The short variant of scripts/cluster_chaos.py, in CI: two daemons on a three-server JetStream
cluster (replicas: 3) under load through both, with a daemon or a NATS server kill -9ed and
restarted every few seconds, repeatedly. Every acknowledged record must be delivered exactly
once and nothing delivered that was never sent. The full runs (minutes, more kills) are quoted
in bench/RESULTS.md and docs/cluster.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_daemons_and_nats_servers_killed_and_restarted_repeatedly_lose_and_repeat_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cluster_chaos.py"), "--seconds", "30", "--daemons", "2",
         "--nats", "3", "--kill-every", "5", "--kill-nats", "--seed", "11"],
        capture_output=True, text=True, timeout=600, env=env)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"{summary}\n{run.stderr[-3000:]}"
    figures = re.search(r"acknowledged (\d+); delivered (\d+) distinct \((\d+) lines\); twice (\d+); "
                        r"never sent (\d+); missing (\d+); kills (\d+): (.*)", summary)
    assert figures, summary
    acked, distinct, _lines, twice, invented, missing, kills = (int(figures.group(k)) for k in range(1, 8))
    assert (twice, invented, missing) == (0, 0, 0)
    assert acked >= 1000 and distinct >= acked
    # Repeatedly: several kills, of daemons (restarted) and of NATS servers.
    victims = figures.group(8)
    assert kills >= 4 and "daemon " in victims and "nats " in victims, victims

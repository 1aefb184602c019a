"""Many sites on one machine: time per round and peak memory of simulated studies of 5, 20
and 50 sites (small sites, few steps), and how each grows with the number of sites.

    python benchmarks/scale.py [--sites 5 20 50] [--rounds 2] [--local-steps 5] [--out benchmarks/results/scale]

Each study is the synthesis demo's task (``synthesis``, DP-SGD on) on tiny sites (3 subjects × 4 slices
at 64×64, trained at 32×32, width 8): the cost of the framework around a site's work, not of
the work. Time per round is split by the coordinator's own view (``server.study.SiteEvent``):
the training phase (first message sent to last reply), the evaluation phase, and the rest
(aggregation, checkpoint, sample grid, metrics). Memory: every process of the study (this
driver, Ray's GCS/raylet, its workers) sampled every 0.25 s; RSS counts a page shared by
several processes once per process, PSS divides it among them (what the machine really holds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path

from medgan.simulation import cpu_share, simulate_federation
from medgan_core.data.simulate import find_sites, simulate_study
from medgan_core.study_config import StudyConfig
from server.study import RoundSummary, SiteEvent


def _tree(root: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _memory(pids: list[int]) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over ``pids`` (smaps_rollup; a process that ended counts 0)."""
    rss = pss = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            continue
    return rss, pss


class PeakMemory(threading.Thread):
    """Samples the memory of this process's whole tree until stopped; keeps the peaks."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_rss, self.peak_pss, self.processes = interval, 0.0, 0.0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(os.getpid())
            rss, pss = _memory(pids)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.processes = max(self.processes, len(pids))
            self.stop.wait(self.interval)


def run_scale(n_sites: int, rounds: int, local_steps: int, work: Path) -> dict[str, object]:
    data = work / f"sites-{n_sites}"
    if not (data / "study.json").exists():
        simulate_study(data, n_sites=n_sites, n_subjects=3, n_slices=4, size=64, seed=0, series=("ct",))
    sites = find_sites(data)
    study = StudyConfig().replace(
        run={"rounds": rounds, "num_sites": n_sites, "device": "cpu"},
        task={"name": "synthesis", "image_size": 32, "width": 8, "z_dim": 16, "batch_size": 8,
              "local_steps": local_steps, "eval_samples": 16},
    )
    events: list[tuple[float, SiteEvent]] = []
    summaries: list[tuple[float, RoundSummary]] = []
    run_dir = work / f"run-{n_sites}"
    shutil.rmtree(run_dir, ignore_errors=True)
    memory = PeakMemory()
    memory.start()
    started = time.monotonic()
    simulate_federation(study, sites, run_dir, watch=lambda e: events.append((time.monotonic(), e)),
                        progress=lambda s: summaries.append((time.monotonic(), s)))
    total = time.monotonic() - started
    memory.stop.set()
    memory.join()
    per_round = []
    for end, summary in summaries:
        def span(phase: str, r: int = summary.server_round) -> float:
            times = [t for t, e in events if e.server_round == r and e.phase == phase]
            return max(times) - min(times) if times else 0.0

        train, evaluate = span("train"), span("evaluate")
        per_round.append({"round": summary.server_round, "seconds": summary.seconds, "train": train,
                          "evaluate": evaluate, "rest": summary.seconds - train - evaluate,
                          "sites": summary.sites_ok})
    warm = [r for r in per_round if r["round"] > 1] or [r for r in per_round if r["round"] > 0]  # round 1 starts workers
    first = next(r for r in per_round if r["round"] == 1)
    return {"sites": n_sites, "cpu-share": cpu_share(os.cpu_count() or 1, n_sites), "total-seconds": total,
            "rounds": per_round, "first-round-seconds": first["seconds"],
            "train-round-seconds": sum(r["seconds"] for r in warm) / len(warm),
            "train-phase-seconds": sum(r["train"] for r in warm) / len(warm),
            "evaluate-seconds": sum(r["evaluate"] for r in warm) / len(warm),
            "peak-rss-mib": memory.peak_rss, "peak-pss-mib": memory.peak_pss, "processes": memory.processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medgan-scale"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale"))
    args = parser.parse_args()
    rows = []
    for n in args.sites:
        rows.append(run_scale(n, args.rounds, args.local_steps, args.work))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
    command = (f"python benchmarks/scale.py --sites {' '.join(map(str, args.sites))} --rounds {args.rounds} "
               f"--local-steps {args.local_steps}")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "memory-gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows},
                                                      indent=2) + "\n")
    base = rows[0]
    lines = ["# Many sites on one machine", "",
             f"Command: `{command}`. Machine: {machine}. Task `synthesis` with DP-SGD, 3 subjects × 4 slices per "
             f"site, 32×32, width 8, batch 8, {args.local_steps} local steps; held-out evaluation every round. "
             "Round: the coordinator's round time, mean over rounds 2 on (round 1 also starts the workers and "
             "decodes the sites: 'first round'); training phase: first message sent to last reply; per site-round: "
             "the training phase divided by the sites; round / work: seconds per site-round against the first row's "
             "(1.0 = time grows exactly as the work). Memory: every process of the study, sampled every 0.25 s.", "",
             "| sites | CPUs per site | first round (s) | round (s) | training phase (s) | evaluation (s) | "
             "per site-round (s) | round / work vs first row | peak RSS (GiB) | peak PSS (GiB) | processes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        growth = (row["train-round-seconds"] / row["sites"]) / (base["train-round-seconds"] / base["sites"])
        lines.append(f"| {row['sites']} | {row['cpu-share']:g} | {row['first-round-seconds']:.1f} | "
                     f"{row['train-round-seconds']:.1f} | {row['train-phase-seconds']:.1f} | {row['evaluate-seconds']:.1f} | "
                     f"{row['train-phase-seconds'] / row['sites']:.2f} | {growth:.2f} | "
                     f"{row['peak-rss-mib'] / 1024:.1f} | {row['peak-pss-mib'] / 1024:.1f} | {row['processes']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()

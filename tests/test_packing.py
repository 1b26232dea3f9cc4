"""Packing, padding and batch samplers; packed per-row losses equal the losses of the rows run one by one."""

import random

import pytest
import torch

from tiny import make_config
from zhiling.data.tokenize import IGNORE_INDEX
from zhiling.errors import ZhilingError
from zhiling.train.packing import (AttentionLayout, LengthGroupedBatchSampler, PackedBatchSampler, PackedCollator,
                                   PaddedCollator, attention_layout, block_causal_mask, default_packing_tokens,
                                   pack_rows, packed_collator_for, useful_tokens)

VOCAB = 300


def random_rows(lengths, seed=0, prompt_fraction=0.4):
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        cut = int(n * prompt_fraction)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


# ----- bin packing ---------------------------------------------------------------------------------------------------
def test_pack_rows_places_every_row_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_rows(lengths, 128)
    assert sorted(i for rows in bins for i in rows) == list(range(500))
    assert all(sum(lengths[i] for i in rows) <= 128 for rows in bins)
    assert all(rows == sorted(rows) for rows in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.05 + 1  # best-fit decreasing is close to the optimum here


def test_pack_rows_is_deterministic_and_fills_exact_fits():
    lengths = [5, 3, 2, 8, 1, 7, 3]
    assert pack_rows(lengths, 10) == pack_rows(list(lengths), 10)
    assert pack_rows([6, 4, 6, 4], 10) == [[0, 3], [1, 2]]  # two exact fits, no third bin
    assert len(pack_rows([10, 10, 10], 10)) == 3


def test_pack_rows_rejects_long_and_empty_rows():
    with pytest.raises(ZhilingError, match="row 1 has 11 tokens"):
        pack_rows([3, 11], 10)
    with pytest.raises(ZhilingError, match="row 0 is empty"):
        pack_rows([0, 3], 10)
    with pytest.raises(ZhilingError, match="max_tokens"):
        pack_rows([1], 0)


def test_packed_sampler_order_depends_only_on_seed_and_epoch():
    lengths = [random.Random(i).randint(1, 60) for i in range(200)]
    first = PackedBatchSampler(lengths, 128, seed=7)
    again = PackedBatchSampler(lengths, 128, seed=7)
    assert first.batches(0) == again.batches(0)
    assert first.batches(0) != first.batches(1)
    assert sorted(map(sorted, first.batches(0))) == sorted(map(sorted, first.batches(1)))
    first.set_epoch(3)
    assert list(first) == again.batches(3)
    assert len(first) == len(again.batches(3))
    assert 0.9 < first.fill_ratio() <= 1.0


def test_default_packing_budget_depends_on_the_device():
    assert default_packing_tokens("cpu", 8, 512) == 512
    assert default_packing_tokens("cuda", 8, 512) == 4096
    assert default_packing_tokens("cuda:1", 2, 1024) == 2048


def test_samplers_shard_across_processes_without_losing_rows():
    lengths = [random.Random(i).randint(1, 60) for i in range(101)]
    for make in (lambda rank: PackedBatchSampler(lengths, 128, seed=3, num_replicas=3, rank=rank),
                 lambda rank: LengthGroupedBatchSampler(lengths, 4, seed=3, group_factor=5, num_replicas=3,
                                                        rank=rank)):
        shards = [make(rank).batches(0) for rank in range(3)]
        assert len({len(shard) for shard in shards}) == 1
        seen = {i for shard in shards for batch in shard for i in batch}
        assert seen == set(range(101))
    with pytest.raises(ZhilingError, match="rank 3"):
        PackedBatchSampler(lengths, 128, num_replicas=3, rank=3).batches()


def test_length_grouped_sampler_groups_similar_lengths_deterministically():
    rng = random.Random(5)
    lengths = [rng.randint(1, 500) for _ in range(400)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=11, group_factor=10)
    batches = sampler.batches(0)
    assert batches == LengthGroupedBatchSampler(lengths, 8, seed=11, group_factor=10).batches(0)
    assert batches != sampler.batches(1)
    assert sorted(i for batch in batches for i in batch) == list(range(400))
    assert max(lengths) in [lengths[i] for i in batches[0]]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_batches = [list(range(i, min(i + 8, 400))) for i in range(0, 400, 8)]
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
    assert padded < 0.75 * padded_random
    with pytest.raises(ZhilingError, match="batch_size"):
        LengthGroupedBatchSampler(lengths, batch_size=0)


# ----- collators -----------------------------------------------------------------------------------------------------
def test_padded_collator_pads_right_and_masks_labels():
    rows = random_rows([3, 5])
    batch = PaddedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0, 3:].tolist() == [0, 0]
    assert batch["labels"][0].tolist() == rows[0]["labels"] + [IGNORE_INDEX] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert useful_tokens(batch) == 8
    assert PaddedCollator(0, pad_to_multiple_of=4)(rows)["input_ids"].shape == (2, 8)
    assert PaddedCollator(0, pad_to_length=16)(rows)["labels"].shape == (2, 16)
    with pytest.raises(ZhilingError, match="pad_to_length=4"):
        PaddedCollator(0, pad_to_length=4)(rows)
    with pytest.raises(ZhilingError, match="row 1 has 5 input_ids but 4 labels"):
        PaddedCollator(0)([rows[0], {"input_ids": rows[1]["input_ids"], "labels": rows[1]["labels"][:4]}])


def test_packed_collator_restarts_positions_and_blocks_cross_row_labels():
    rows = random_rows([4, 3], prompt_fraction=0.0)  # every label trained, so the boundary label would be live
    batch = PackedCollator(AttentionLayout("sdpa"))(rows)
    assert batch["input_ids"].shape == (1, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[4] == IGNORE_INDEX
    assert labels[1:4] == rows[0]["labels"][1:] and labels[5:] == rows[1]["labels"][1:]
    mask = batch["attention_mask"]
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.bool
    assert mask[0, 0, 5].tolist() == [False, False, False, False, True, True, False]
    assert mask[0, 0, 3].tolist() == [True, True, True, True, False, False, False]
    assert useful_tokens(batch) == 7


def test_packed_collator_eager_mask_is_additive_and_flash_gets_boundaries():
    rows = random_rows([2, 3])
    eager = PackedCollator(AttentionLayout("eager"), torch.float32)(rows)["attention_mask"]
    assert eager.dtype == torch.float32
    assert eager[0, 0, 1, 0] == 0 and eager[0, 0, 2, 1] == torch.finfo(torch.float32).min
    flash = PackedCollator(AttentionLayout("flash_attention_2"))(rows)
    assert "attention_mask" not in flash
    assert flash["cu_seq_lens_q"].tolist() == [0, 2, 5] and flash["cu_seq_lens_q"].dtype == torch.int32
    assert flash["max_length_q"] == 3 and flash["max_length_k"] == 3
    with pytest.raises(ZhilingError, match="exceeds max_tokens=4"):
        PackedCollator(max_tokens=4)(rows)
    with pytest.raises(ZhilingError, match="no rows"):
        PackedCollator()([])


def test_sliding_window_layers_get_their_own_mask():
    config = make_config("gemma3", VOCAB, layers=6)
    config.sliding_window = 4
    config._attn_implementation = "sdpa"
    layout = attention_layout(config)
    assert layout.windows == {"full_attention": None, "sliding_attention": 4}
    batch = PackedCollator(layout)(random_rows([6, 3]))
    masks = batch["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"][0, 0, 5, :6].all()
    assert masks["sliding_attention"][0, 0, 5, :6].tolist() == [False, False, True, True, True, True]
    short = PackedCollator(layout)(random_rows([3, 2]))["attention_mask"]
    assert short["sliding_attention"] is short["full_attention"]  # window never reached: one mask serves both
    assert block_causal_mask([3], window=2).tolist() == [[True, False, False], [True, True, False],
                                                         [False, True, True]]


def test_layouts_of_other_families():
    llama = make_config("llama", VOCAB)
    llama._attn_implementation = "eager"
    assert attention_layout(llama) == AttentionLayout("eager", None, None)
    qwen = make_config("qwen2", VOCAB)
    assert attention_layout(qwen).windows is None and attention_layout(qwen).window is None
    from transformers import AutoConfig

    mistral = AutoConfig.for_model("mistral", sliding_window=16, num_hidden_layers=1)
    assert attention_layout(mistral).window == 16


# ----- equivalence: packed rows see nothing of their neighbours ------------------------------------------------------
def _tiny_model(family: str, kernel: str, window: int | None = None, layers: int = 2):
    from transformers import AutoModelForCausalLM

    config = make_config(family, VOCAB, layers=layers)
    if window is not None:
        config.sliding_window = window
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=kernel).eval()


def _row_losses_from_logits(logits, labels, lengths):
    losses, start = [], 0
    for n in lengths:
        row_logits, row_labels = logits[start:start + n - 1], labels[start + 1:start + n]
        losses.append(torch.nn.functional.cross_entropy(row_logits, row_labels, ignore_index=IGNORE_INDEX))
        start += n
    return torch.stack(losses)


CASES = [("llama", "sdpa", None, 2), ("llama", "eager", None, 2), ("qwen2", "sdpa", None, 2),
         ("qwen2", "eager", None, 2), ("gemma3", "sdpa", None, 2), ("gemma3", "sdpa", 4, 6),
         ("gemma3", "eager", 4, 6)]


@pytest.mark.parametrize("family,kernel,window,layers", CASES)
def test_packed_row_losses_equal_rows_run_alone(family, kernel, window, layers):
    model = _tiny_model(family, kernel, window, layers)
    lengths = [9, 14, 6, 11]
    rows = random_rows(lengths, seed=3)
    with torch.no_grad():
        alone = torch.stack([
            _row_losses_from_logits(model(input_ids=torch.tensor([row["input_ids"]])).logits[0],
                                    torch.tensor(row["labels"]), [len(row["input_ids"])])[0] for row in rows])
        batch = packed_collator_for(model, max_tokens=64)(rows)
        labels = batch.pop("labels")
        logits = model(**batch).logits[0]
    packed = _row_losses_from_logits(logits, labels[0], lengths)
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0), (packed - alone).abs().max()


def test_packing_without_the_window_mask_would_differ():
    """Guards the test above: with rows longer than the window, a single full mask gives other losses."""
    model = _tiny_model("gemma3", "sdpa", window=4, layers=6)
    rows = random_rows([9, 14], seed=3)
    with torch.no_grad():
        right = packed_collator_for(model)(rows)
        wrong = PackedCollator(AttentionLayout("sdpa"))(rows)
        labels = right.pop("labels")[0]
        wrong.pop("labels")
        good = _row_losses_from_logits(model(**right).logits[0], labels, [9, 14])
        bad = _row_losses_from_logits(model(**wrong).logits[0], labels, [9, 14])
    assert (good - bad).abs().max() > 1e-4

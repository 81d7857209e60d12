"""BertClassifier: the split forward equals transformers' own, and the frozen-prefix cache changes nothing."""

from __future__ import annotations

import pytest
import torch

from models import BertClassifier, ShapeSharedBert
from parsing import parser_refuses


def sentences(n: int = 10, max_length: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_length + 1, (n,), generator=generator)
    ids = torch.randint(1000, 5000, (n, max_length), generator=generator)
    mask = (torch.arange(max_length) < lengths[:, None]).long()
    return ids * mask, mask


def batches(ids, mask, order, size):
    """Dynamically padded batches in the datamodule's format."""
    for start in range(0, len(order), size):
        uid = order[start : start + size]
        length = int(mask[uid].sum(1).max())
        yield {"input_ids": ids[uid, :length], "attention_mask": mask[uid, :length], "uid": uid}


def test_split_forward_equals_the_transformers_forward():
    torch.manual_seed(0)
    net = BertClassifier((16,), 2, encoder="random-tinybert").eval()
    ids, mask = sentences()
    expected = net.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(net({"input_ids": ids, "attention_mask": mask}), expected, rtol=1e-5, atol=1e-5)


def test_cached_and_uncached_logits_agree_and_training_still_flows():
    torch.manual_seed(0)
    for net in (BertClassifier((16,), 2, encoder="random-tinybert", trainable_top_layers=1),
                ShapeSharedBert((16,), 2, encoder="random-tinybert", wrapped_top_layers=2)):
        net.eval()
        ids, mask = sentences(n=12)
        uncached = torch.cat([net(b) for b in batches(ids, mask, torch.arange(12), 5)])
        net.prepare_cache(list(batches(ids, mask, torch.randperm(12), 4)))  # cache built in another order/padding
        assert net._cache is not None and net._cache_depth == net.frozen_depth() > 0
        cached = torch.cat([net(b) for b in batches(ids, mask, torch.arange(12), 5)])
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)
        net.train()
        net(next(batches(ids, mask, torch.arange(12), 6))).sum().backward()
        assert all(p.grad is None for p in net.model.bert.embeddings.parameters())


def test_frozen_prefix_runs_in_eval_mode_during_training():
    net = BertClassifier((16,), 2, encoder="random-tinybert", trainable_top_layers=2).train()
    assert not net.model.bert.embeddings.training
    assert [layer.training for layer in net.layers] == [False, False, True, True]


def test_trainable_top_layers_is_checked_by_the_parser_and_against_the_encoder():
    assert parser_refuses(BertClassifier, trainable_top_layers=-1)
    assert not parser_refuses(BertClassifier, trainable_top_layers=0)
    with pytest.raises(ValueError, match=r"model.net.trainable_top_layers must be in \[0, 4\]"):  # TinyBERT: 4 layers
        BertClassifier((16,), 2, encoder="random-tinybert", trainable_top_layers=5)

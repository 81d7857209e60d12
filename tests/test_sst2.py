"""SST2DataModule on a tiny generated rt-snippets file with the packaged MiniLM tokenizer; nothing is downloaded."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
from parsing import parser_refuses
import torch

import datamodules.sst2 as sst2_module
from datamodules import SST2DataModule

REAL_FILE = Path(__file__).resolve().parents[1] / "data" / "rt-snippets" / sst2_module.RT_FILE
N_ROWS = 120  # every 10th rating is 0 -> 108 labelled sentences


def refuse(*args, **kwargs):
    raise RuntimeError("network disabled in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """GLUE and pip fail at once, as they do offline (a stub module also spares importing ``datasets``)."""
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=refuse))
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(sst2_module, "hub_reachable", lambda: True)  # so that the datasets stub is reached


def snippet_rows(n: int = N_ROWS) -> list[tuple[int, float, str]]:
    rows = []
    for i in range(1, n + 1):
        rating = 0.0 if i % 10 == 0 else (1.5 + i % 3 if i % 2 else -2.25)
        word = "neutral" if rating == 0 else ("good" if rating > 0 else "bad")
        rows.append((i, rating, f"{word} film number {i}" + " really" * (i % 9) + (" café." if i % 4 == 0 else ".")))
    return rows


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "rt-snippets").mkdir()
    text = "\r\n".join(f"{i}\t{rating}\t{text}" for i, rating, text in snippet_rows())
    (root / "rt-snippets" / sst2_module.RT_FILE).write_bytes(text.encode("utf-8"))
    return root


def make(root: Path, **kwargs) -> SST2DataModule:
    kwargs = {"source": "rt-snippets", "encoder": "minilm", "train_size": None, "max_length": 16, **kwargs}
    dm = SST2DataModule(root=str(root), **kwargs)
    dm.setup()
    return dm


def test_zero_ratings_dropped_and_labels_follow_the_sign(root):
    texts, labels = sst2_module.read_rt_snippets(root / "rt-snippets" / sst2_module.RT_FILE)
    assert len(texts) == 108 and not any(t.startswith("neutral") for t in texts)
    assert labels.tolist() == [int(t.startswith("good")) for t in texts]
    assert texts[3] == "bad film number 4 really really really really café."  # UTF-8, CRLF stripped
    assert texts[-1] == "good film number 119 really really."


def test_auto_falls_back_to_rt_snippets_and_says_so(root):
    dm = make(root, source="auto", train_size=40, val_fraction=0.25)
    dm.prepare_data()  # again, as a trainer.test after trainer.fit does
    assert dm.name == "rt-snippets-40" and dm.encoder_name == "minilm-l6"
    assert "GLUE SST-2 unavailable (RuntimeError)" in dm.source and "vaderSentiment" in dm.source
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [30, 10, 11]  # test: 6 + 5
    assert dm.input_shape == (16,) and dm.num_classes == 2
    for uid, label in zip(dm.splits["test"][0].tolist(), dm.splits["test"][1].tolist()):
        assert label == int(dm.texts[uid].startswith("good"))


def test_glue_path_uses_validation_as_test(root, monkeypatch):
    def load_dataset(*args):
        split = lambda n: {"sentence": [f"ok {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}  # noqa: E731
        return {"train": split(50), "validation": split(8)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = make(root, source="auto", train_size=None, val_fraction=0.2)
    assert dm.name == "sst2" and "GLUE" in dm.source
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [40, 10, 8]


def test_subset_is_seeded(root):
    def picked(seed: int) -> set[str]:
        dm = make(root, train_size=30, subset_seed=seed)
        return {dm.texts[int(u)] for s in ("train", "val") for u in dm.splits[s][0]}

    first = picked(0)
    assert len(first) == 30 and picked(0) == first and picked(1) != first


def test_batches_are_dynamically_padded(root):
    dm = make(root, batch_size=8, eval_batch_size=16)
    pad = 0  # MiniLM's [PAD]
    for loader in (dm.train_dataloader(), dm.test_dataloader()):
        for inputs, labels in loader:
            ids, mask, uid = inputs["input_ids"], inputs["attention_mask"], inputs["uid"]
            lengths = dm.lengths[uid]
            assert ids.dtype == mask.dtype == uid.dtype == torch.long and len(labels) == len(uid)
            assert ids.shape == mask.shape == (len(uid), int(lengths.max()))
            assert torch.equal(mask.sum(1), lengths)
            assert torch.all(ids[mask == 0] == pad) and torch.all(ids[mask == 1] != pad)
    assert dm.lengths.max() == 16  # the longest generated sentences are truncated to max_length


def test_uids_unique_and_all_inputs_covers_each_once(root):
    dm = make(root, eval_batch_size=25, val_fraction=0.2)
    split_uids = torch.cat([dm.splits[s][0] for s in ("train", "val", "test")])
    assert len(split_uids) == len(set(split_uids.tolist())) == 108
    batches = dm.all_inputs()
    assert len(batches) == 5 and set(batches[0]) == {"input_ids", "attention_mask", "uid"}
    assert sorted(torch.cat([b["uid"] for b in batches]).tolist()) == sorted(split_uids.tolist())
    inputs, _ = next(iter(dm.val_dataloader()))
    uid = int(inputs["uid"][0])
    n = int(dm.lengths[uid])
    assert torch.equal(batches[uid // 25]["input_ids"][uid % 25, :n], inputs["input_ids"][0, :n])


def test_missing_file_and_failed_download_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"place it .*vaderSentiment==3.3.2.* at {tmp_path}"):
        SST2DataModule(source="rt-snippets", root=str(tmp_path)).prepare_data()
    with pytest.raises(FileNotFoundError, match="data.source=rt-snippets"):
        SST2DataModule(source="glue", root=str(tmp_path)).prepare_data()


def test_extracts_the_file_from_a_vader_style_sdist(tmp_path, monkeypatch):
    def fake_pip(command, **kwargs):
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w:gz") as tar:
            data = b"1\t2.5\tgreat\r\n2\t-1.0\tdull"
            info = tarfile.TarInfo(sst2_module.RT_MEMBER)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        dest = Path(command[command.index("-d") + 1])
        with tarfile.open(dest / "vaderSentiment-3.3.2.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{sst2_module.RT_ARCHIVE}")
            info.size = len(inner.getvalue())
            tar.addfile(info, io.BytesIO(inner.getvalue()))

    monkeypatch.setattr(subprocess, "run", fake_pip)
    target = tmp_path / "rt-snippets" / sst2_module.RT_FILE
    sst2_module.fetch_rt_snippets(target)
    assert sst2_module.read_rt_snippets(target)[1].tolist() == [1, 0]
    assert not target.with_suffix(".part").exists()


@pytest.mark.parametrize("kwargs, field", [({"source": "sst"}, "data.source"), ({"train_size": 0}, "data.train_size"),
                                           ({"max_length": 1}, "data.max_length")])
def test_bad_arguments_name_the_field(kwargs, field):
    assert parser_refuses(SST2DataModule, **kwargs)


@pytest.mark.skipif(not REAL_FILE.is_file(), reason="data/rt-snippets not fetched yet (run prepare_data once)")
def test_real_rt_snippets_file():
    rows = REAL_FILE.read_bytes().decode("utf-8").split("\r\n")
    assert len(rows) == 10_605 and sum(float(row.split("\t")[1]) == 0 for row in rows) == 37
    texts, labels = sst2_module.read_rt_snippets(REAL_FILE)
    assert len(texts) == 10_568 and labels.sum() == 5_242

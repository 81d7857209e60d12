"""SST-2 binary sentiment for BERT encoders: GLUE SST-2 when it can be had, else ``rt-snippets``.

``source``:
* ``glue``: GLUE SST-2 through HF ``datasets``. Its 67,349 ``train`` sentences are the training pool; its 872
  ``validation`` sentences are the TEST split (GLUE's test labels are hidden).
* ``rt-snippets``: the 10,605 Rotten Tomatoes sentences (the pool SST was built from) with mean human ratings in
  [-4, 4] that ship in the PyPI sdist ``vaderSentiment==3.3.2`` (``additional_resources/hutto_ICWSM_2014.tar.gz``).
  Label = rating > 0; the 37 rating-0 rows are dropped. A fixed stratified 10% of the 10,568 labelled sentences
  (seed ``RT_SPLIT_SEED``) is the test split, the rest the training pool. Not SST-2: results say ``rt-snippets``.
* ``auto``: ``glue``, and ``rt-snippets`` when that fails for any reason.

``train_size`` sentences (1,000 in the parity setting, named e.g. ``sst2-1k``) are drawn from the pool with a
generator seeded by ``subset_seed``; the validation split is then a stratified ``val_fraction`` of them.
Everything is tokenised once in ``setup``. Every sentence has a ``uid`` (its row in ``input_ids``, unique across
splits); batches are ``({"input_ids", "attention_mask", "uid"}, labels)`` trimmed to the batch's longest sentence.
"""

import subprocess
import sys
import tarfile
import tempfile
from itertools import chain
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import Ge

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.tensor_data import EpochBatchSampler, TensorDataModule, stratified_split
from encoders import hub_reachable, resolve_encoder
from constraints import PositiveInt
from seeding import global_seed

VADER_SDIST = "vaderSentiment==3.3.2"
RT_FILE = "movieReviewSnippets_GroundTruth.txt"
RT_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"  # inside the sdist's top folder
RT_MEMBER = f"hutto_ICWSM_2014/{RT_FILE}"  # inside RT_ARCHIVE
RT_TEST_FRACTION = 0.1
RT_SPLIT_SEED = 0  # fixed: the rt-snippets test split never changes

Texts = tuple[list[str], Tensor, list[str], Tensor]  # pool sentences, pool labels, test sentences, test labels


def read_rt_snippets(path: Path) -> tuple[list[str], Tensor]:
    """Sentences and labels (rating > 0) of a ``id<TAB>rating<TAB>text`` file, rating-0 rows dropped."""
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        _, rating, text = line.split("\t", 2)
        if float(rating) != 0.0:
            texts.append(text.strip())
            labels.append(int(float(rating) > 0))
    return texts, torch.tensor(labels, dtype=torch.long)


def fetch_rt_snippets(target: Path) -> None:
    """Extract ``RT_FILE`` from the ``vaderSentiment`` sdist (fetched with pip) to ``target``."""
    rank_zero_info(f"[data] {target} missing: fetching it from the PyPI sdist {VADER_SDIST} with pip")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER_SDIST, "-d", tmp],
                check=True, capture_output=True,
            )
            (sdist,) = Path(tmp).glob("vaderSentiment-*.tar.gz")
            with tarfile.open(sdist) as outer:
                inner_name = next(m for m in outer.getnames() if m.endswith(RT_ARCHIVE))
                with tarfile.open(fileobj=outer.extractfile(inner_name)) as inner:
                    data = inner.extractfile(RT_MEMBER).read()
        except Exception as error:  # pip offline, another sdist layout: the same instruction
            raise FileNotFoundError(
                f"{RT_FILE} could not be fetched ({type(error).__name__}); place it (from {RT_ARCHIVE} in the PyPI "
                f"sdist {VADER_SDIST}) at {target}."
            ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    part.write_bytes(data)
    part.replace(target)


class TokenBatches(Dataset):
    """``dataset[indices] -> ({input_ids, attention_mask, uid}, labels)``, trimmed to the longest sentence."""

    def __init__(self, uids: Tensor, labels: Tensor, input_ids: Tensor, lengths: Tensor) -> None:
        self.uids, self.labels, self.input_ids, self.lengths = uids, labels, input_ids, lengths

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        uid = self.uids[index]
        lengths = self.lengths[uid]
        width = int(lengths.max())
        mask = (torch.arange(width) < lengths[:, None]).long()
        return {"input_ids": self.input_ids[uid, :width], "attention_mask": mask, "uid": uid}, self.labels[index]


class SST2DataModule(TensorDataModule):
    """Tokenised binary sentiment sentences; see the module docstring for sources and splits.

    Args:
        source: ``auto``, ``glue`` (GLUE SST-2 only) or ``rt-snippets`` (the offline stand-in only).
        train_size: training sentences drawn from the pool (train + validation); None: the whole pool.
        subset_seed: seed of that draw.
        encoder: encoder whose tokenizer is used, resolved by ``encoders.resolve_encoder``.
        max_length: sentences are truncated to this many tokens (special tokens included).
        batch_size: training batch size.
        **kwargs: see ``TensorDataModule``.
    """

    name = "sst2"
    num_classes = 2

    def __init__(
        self,
        source: Literal["auto", "glue", "rt-snippets"] = "auto",
        train_size: PositiveInt | None = 1000,
        subset_seed: int = 0,
        encoder: str = "auto",
        max_length: Annotated[int, Ge(3)] = 64,  # [CLS], a token, [SEP]
        batch_size: PositiveInt = 32,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.requested_source, self.train_size, self.subset_seed = source, train_size, subset_seed
        self.encoder, self.max_length, self.input_shape = encoder, max_length, (max_length,)
        self.encoder_name = ""
        self.texts: list[str] = []  # by uid
        self.input_ids, self.lengths, self.labels = (torch.zeros(0, dtype=torch.long) for _ in range(3))
        self._texts: Texts | None = None

    # --- sources ------------------------------------------------------------------------------------------
    def _glue(self) -> Texts:
        if not hub_reachable():  # fail at once offline instead of after the hub client's retries
            raise ConnectionError("the Hugging Face hub cannot be reached")
        import datasets  # noqa: PLC0415 (slow import, only on this path)

        glue = datasets.load_dataset("glue", "sst2")
        as_y = lambda split: torch.tensor(list(glue[split]["label"]), dtype=torch.long)  # noqa: E731
        return list(glue["train"]["sentence"]), as_y("train"), list(glue["validation"]["sentence"]), as_y("validation")

    def _rt_snippets(self) -> Texts:
        path = Path(self.root) / "rt-snippets" / RT_FILE
        if not path.is_file():
            fetch_rt_snippets(path)
        texts, labels = read_rt_snippets(path)
        pool, test = stratified_split(labels, RT_TEST_FRACTION, RT_SPLIT_SEED)
        return [texts[i] for i in pool], labels[pool], [texts[i] for i in test], labels[test]

    def prepare_data(self) -> None:
        if self._texts is not None:  # Lightning calls it again on every fit/test of the same datamodule
            return
        glue_error = None
        if self.requested_source != "rt-snippets":
            try:
                self._texts = self._glue()
                self.name, self.source = "sst2", "GLUE SST-2 via HF datasets (test split = GLUE validation)"
                return
            except Exception as error:  # offline, hub error, missing package: all mean "use the stand-in"
                if self.requested_source == "glue":
                    raise FileNotFoundError(
                        f"GLUE SST-2 could not be loaded ({type(error).__name__}: {error}); run with internet access "
                        "or set data.source=rt-snippets for the offline stand-in."
                    ) from None
                glue_error = type(error).__name__
        self._texts = self._rt_snippets()
        fallback = f"; GLUE SST-2 unavailable ({glue_error})" if glue_error else ""
        self.name = "rt-snippets"
        self.source = f"rt-snippets: Rotten Tomatoes sentences from PyPI {VADER_SDIST}, fixed 90/10 split{fallback}"

    # --- tensors ------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(ids (N, max_length) padded with the pad id, lengths (N,))`` for ``texts``."""
        from transformers import AutoTokenizer  # noqa: PLC0415

        enc = resolve_encoder(self.encoder)
        self.encoder_name = enc.name
        tokenizer = AutoTokenizer.from_pretrained(enc.source or resolve_encoder("minilm").source)  # same vocab
        ids = tokenizer(texts, truncation=True, max_length=self.max_length, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
        table = torch.full((len(ids), self.max_length), tokenizer.pad_token_id, dtype=torch.long)
        flat = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
        table[torch.arange(self.max_length) < lengths[:, None]] = flat  # row-major: row i gets its lengths[i] ids
        return table, lengths

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._texts is None:
            self.prepare_data()
        pool_texts, pool_y, test_texts, test_y = self._texts
        if self.train_size is not None:
            if self.train_size > len(pool_texts):
                limit = f"{len(pool_texts):,} (the pool size)"
                raise ValueError(f"data.train_size must be None or at most {limit}; got {self.train_size}.")
            generator = torch.Generator().manual_seed(self.subset_seed)
            pick = torch.randperm(len(pool_texts), generator=generator)[: self.train_size].sort().values
            pool_texts, pool_y = [pool_texts[i] for i in pick], pool_y[pick]
            n = self.train_size
            self.name += f"-{n // 1000}k" if n % 1000 == 0 else f"-{n}"
            self.source += f"; {n:,} training sentences drawn with subset_seed={self.subset_seed}"
        self.texts = pool_texts + test_texts
        self.input_ids, self.lengths = self.tokenize(self.texts)
        self.labels = torch.cat([pool_y, test_y])
        uids = torch.arange(len(self.texts))
        # inputs are uids: the base class splits and checks them, TokenBatches turns them into token batches
        return uids[: len(pool_y)], pool_y, uids[len(pool_y) :], test_y

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        uids, y = self.splits[split]
        seed = global_seed() if self.shuffle_seed is None else self.shuffle_seed
        batch_size = self.batch_size if train else self.eval_batch_size
        sampler = EpochBatchSampler(len(uids), batch_size, shuffle=train, seed=seed, **self.process_share())
        dataset = TokenBatches(uids, y, self.input_ids, self.lengths)
        # batch_size=None and a private generator: see TensorDataModule._loader.
        return DataLoader(dataset, sampler=sampler, batch_size=None, generator=torch.Generator().manual_seed(seed))

    def all_inputs(self) -> list[dict[str, Tensor]]:
        """Every sentence of every split once, in uid order, as input dicts of ``eval_batch_size`` sentences."""
        if not self.splits:
            self.setup()
        dataset = TokenBatches(torch.arange(len(self.labels)), self.labels, self.input_ids, self.lengths)
        return [dataset[index][0] for index in EpochBatchSampler(len(dataset), self.eval_batch_size, shuffle=False)]

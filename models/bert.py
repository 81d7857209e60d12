"""A BERT sentence classifier whose frozen bottom can be computed once and cached.

``BertClassifier`` wraps ``transformers``' ``BertForSequenceClassification`` and runs it as
``embeddings -> layers[0:k] -> layers[k:] -> pooler -> classifier`` where ``k`` is the first encoder layer
holding a trainable parameter (after any technique has changed the model). Everything below ``k`` is a frozen
feature extractor: it runs in eval mode (no dropout) and, with ``cache_frozen_prefix``, its output is computed
once per sentence (keyed by the datamodule's ``uid``) and reused every epoch. On two CPU cores this turns
hours per epoch into minutes (shared/DATA.md); cached and uncached logits agree to float precision (tested).
"""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as hf_logging

from constraints import NonNegativeInt
from encoders import TINYBERT_DIMS, resolve_encoder

Batch = dict[str, Tensor]


def load_bert_classifier(encoder: str, num_classes: int) -> tuple[BertForSequenceClassification, str]:
    """``BertForSequenceClassification`` with pretrained encoder weights (random ones for ``random-tinybert``)."""
    resolved = resolve_encoder(encoder)
    if resolved.source is None:
        return BertForSequenceClassification(BertConfig(**TINYBERT_DIMS, num_labels=num_classes)), resolved.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the freshly initialised classifier is expected, not news
    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolved.source, num_labels=num_classes)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not isinstance(model, BertForSequenceClassification):
        raise ValueError(f"model.encoder must be a BERT-family checkpoint; {encoder!r} loads {type(model).__name__}.")
    return model, resolved.name


class BertClassifier(nn.Module):
    """BERT encoder + pooler + linear classifier on ``{"input_ids", "attention_mask", "uid"}`` batches.

    Args:
        input_shape: ``(max_length,)`` from the datamodule (unused beyond the example input).
        num_classes: number of labels.
        encoder: ``auto`` (TinyBERT online, MiniLM offline), ``tinybert``, ``minilm``, ``random-tinybert``, or a
            hub id / local path (see ``encoders``).
        trainable_top_layers: how many of the top encoder layers train (with the classifier); the pooler,
            embeddings and the layers below stay frozen.
        cache_frozen_prefix: compute the frozen bottom once per sentence and reuse it (needs ``uid`` in batches).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        encoder: str = "auto",
        trainable_top_layers: NonNegativeInt = 2,
        cache_frozen_prefix: bool = True,
    ) -> None:
        super().__init__()
        self.model, self.encoder_name = load_bert_classifier(encoder, num_classes)
        layers = self.model.bert.encoder.layer
        if not 0 <= trainable_top_layers <= len(layers):
            raise ValueError(f"model.net.trainable_top_layers must be in [0, {len(layers)}], got {trainable_top_layers}.")
        self.model.requires_grad_(False)
        for layer in layers[len(layers) - trainable_top_layers :]:
            layer.requires_grad_(True)
        self.model.classifier.requires_grad_(True)
        self.max_length = int(input_shape[0])
        self.cache_frozen_prefix = cache_frozen_prefix
        self._cache: Tensor | None = None  # (sentences, max_length, hidden); derived data, never saved
        self._cache_depth = -1

    # --- structure ----------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.bert.encoder.layer

    def frozen_depth(self) -> int:
        """Index of the first encoder layer with a trainable parameter (all layers frozen: their count)."""
        for index, layer in enumerate(self.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return index
        return len(self.layers)

    def train(self, mode: bool = True) -> "BertClassifier":
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.model.bert.embeddings.parameters()):
            self.model.bert.embeddings.eval()  # frozen feature extractor: no dropout, as in the cache
            for layer in self.layers[: self.frozen_depth()]:
                layer.eval()
        return self

    def example_input(self) -> Batch:
        ids = torch.full((1, self.max_length), 100, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # --- forward ------------------------------------------------------------------------------------------
    def _mask(self, hidden: Tensor, attention_mask: Tensor) -> Tensor | None:
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def _run_layers(self, hidden: Tensor, attention_mask: Tensor, layers: Iterable[nn.Module]) -> Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def prefix(self, batch: Batch, depth: int) -> Tensor:
        """Hidden states after the embeddings and the first ``depth`` encoder layers."""
        hidden = self.model.bert.embeddings(input_ids=batch["input_ids"])
        return self._run_layers(hidden, batch["attention_mask"], self.layers[:depth])

    def forward(self, batch: Batch) -> Tensor:
        depth = self.frozen_depth()
        cached = self._cache is not None and self._cache_depth == depth and "uid" in batch
        if cached:
            hidden = self._cache[batch["uid"], : batch["input_ids"].shape[1]]
        else:
            hidden = self.prefix(batch, depth)
        hidden = self._run_layers(hidden, batch["attention_mask"], self.layers[depth:])
        pooled = self.model.bert.pooler(hidden)
        return self.model.classifier(self.model.dropout(pooled))

    # --- cache --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_cache(self, batches: Sequence[Batch]) -> None:
        """Run the frozen prefix once over ``batches`` (every sentence once, any order) and keep its outputs."""
        depth = self.frozen_depth()
        if not self.cache_frozen_prefix or depth == 0 or self._cache_depth == depth:
            return
        num_sentences = 1 + max(int(batch["uid"].max()) for batch in batches)
        was_training = self.training
        self.eval()
        hidden_size = self.model.config.hidden_size
        device = next(self.parameters()).device
        cache = torch.zeros(num_sentences, self.max_length, hidden_size, device=device)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            cache[batch["uid"], : batch["input_ids"].shape[1]] = self.prefix(batch, depth)
        self.train(was_training)
        self._cache, self._cache_depth = cache, depth

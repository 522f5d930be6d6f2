"""Parameter counts from a config, without building the model (meta device)."""
from __future__ import annotations

from sfedge.config import ModelConfig


def count_parameters(config: ModelConfig) -> dict:
    import torch

    from sfedge.models import SFLlava

    with torch.device("meta"):
        model = SFLlava(config, max_seq_len=1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    embedding = count(model.token_embedding)
    decoder = count(model.text_decoder)
    if config.llm.tie_embeddings:
        decoder -= model.text_decoder.lm_head.weight.numel()
    counts = {"vision_encoder": count(model.vision_encoder), "projector": count(model.projector),
              "token_embedding": embedding, "text_decoder": decoder}
    counts["llm_total"] = embedding + decoder
    counts["total"] = counts["vision_encoder"] + counts["projector"] + counts["llm_total"]
    return counts

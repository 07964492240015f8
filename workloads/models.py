"""Models from ``transformers`` configs (random init, nothing downloaded), their losses and the
optimizer recipes the examples and benchmarks train with."""

from __future__ import annotations

import ast

import torch
from torch import nn

# torch.optim.AdamW's implementations: the same update rule, different kernels
ADAMW_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def gpt2_model(dim: int = 256, layers: int = 4, heads: int = 4, context: int = 64) -> nn.Module:
    """A GPT-2 LM (``transformers.GPT2Config``) over bytes, random init, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=dim, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def resnet_model(width: int = 32, depths: tuple = (1, 1, 1, 1)) -> nn.Module:
    """A ResNet (``transformers.ResNetConfig``, basic blocks) for the 10 digit classes."""
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = ResNetConfig(num_channels=3, embedding_size=width, hidden_sizes=[width * 2**i for i in range(4)],
                          depths=list(depths), layer_type="basic", num_labels=10, downsample_in_first_stage=False)
    return ResNetForImageClassification(config)


def mlp_model(width: int = 1024, layers: int = 8) -> nn.Module:
    """The communication-heavy check of DESIGN.md: ``layers`` x Linear(width, width) with ReLU
    between them (8 x 1024: 8.4M parameters for ~17 MFLOP per sample)."""
    blocks = []
    for i in range(layers):
        blocks.append(nn.Linear(width, width))
        if i < layers - 1:
            blocks.append(nn.ReLU())
    return nn.Sequential(*blocks)


def mlp_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Predict the next ``width`` bytes of the sources from the previous ones (scaled to [0, 1])."""
    x = window.float().div_(255.0)
    half = x.shape[1] // 2
    return nn.functional.mse_loss(model(x[:, :half]), x[:, half : 2 * half])


def lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy of a causal LM on windows of ``context + 1`` bytes."""
    logits = model(input_ids=window[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


def cnn_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(pixel_values=x).logits, y)


def parse_value(text: str):
    """A command-line option value: a Python literal when it parses as one, else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_optimizer(name: str, model: nn.Module, lr: float, projector: str = "dct", rank_fraction: float = 0.25,
                    gap: int = 50, adamw: dict | None = None):
    """torch's AdamW, or a commlib low-rank optimizer with GaLore's recipe: the transformer blocks'
    matrices projected at rank ``rank_fraction`` x their smaller side, AdamW for the rest."""
    from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **(adamw or {}))
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and ".h." in f".{n}"]
    if not matrices:  # not a GPT-2: every matrix and convolution
        matrices = [p for p in model.parameters() if p.dim() >= 2]
    ids = {id(p) for p in matrices}
    others = [p for p in model.parameters() if id(p) not in ids]
    group = {"params": matrices, "update_proj_gap": gap, "projector": projector}
    if name == "frugal":
        return FrugalAdamW([{"params": others}, {**group, "density": rank_fraction}], lr=lr)
    rank = max(1, int(rank_fraction * min(min(p.shape[0], p[0].numel()) for p in matrices)))
    cls = {"galore": GaLoreAdamW, "fira": FiraAdamW}[name]
    return cls([{"params": others}, {**group, "rank": rank}], lr=lr)

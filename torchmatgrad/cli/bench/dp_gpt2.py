"""``python -m torchmatgrad bench --case dp-gpt2``: ``--case dp``'s four variants on a Hugging Face
GPT-2 language model (transformers' ``GPT2LMHeadModel``, random weights from a config, no
download): ``--blocks`` layers of width ``--d`` (12 heads of d/12), GPT-2's vocabulary (50257,
the head tied to the token embedding) and positions, dropout off; loss_i: sample i's mean
next-token cross entropy against random labels.

The non-private and torchmatgrad variants run the model after ``convert_linear`` (every Conv1D
and the head on torchmatgrad's kernels; the DP step clips the tied head/embedding and the
position embedding, looked up with ids [1, T], as docs/per_sample.md says); Opacus's get the
unconverted model (its Conv1D layers go to Opacus's generic functorch samplers). Δgrad shows
where Opacus's gradient differs from the definition: its "hooks" mode gives the shared position
embedding one gradient for the whole batch instead of one per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchmatgrad

VOCAB, POSITIONS = 50257, 1024


class LM(torch.nn.Module):
    """The GPT-2 LM returning its logits (Opacus's wrappers expect a tensor)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


class TokenCE(torch.nn.Module):
    """Per-sample mean token cross entropy; ``reduction`` as Opacus's criteria have it."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        loss = loss.view(labels.shape).mean(1)
        return loss if self.reduction == "none" else loss.sum()


def setup(blocks: int, d: int, B: int, T: int, device: torch.device, seed: int):
    """(base model, token ids [B, T], labels [B, T], _steps keywords)."""
    try:
        import transformers
    except ImportError as e:
        raise SystemExit(
            "bench --case dp-gpt2 needs transformers (pip install transformers)"
        ) from e
    cfg = transformers.GPT2Config(
        n_layer=blocks,
        n_embd=d,
        n_head=max(1, d // 64),
        vocab_size=VOCAB,
        n_positions=max(POSITIONS, T),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    base = LM(transformers.GPT2LMHeadModel(cfg)).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g).to(device)
    labels = torch.randint(0, VOCAB, (B, T), generator=g).to(device)
    return base, ids, labels, {"criterion": TokenCE, "prepare": torchmatgrad.nn.convert_linear}

"""What the Hugging Face parity tests share: the metric, random weights, and the reference."""

import numpy as np
import torch

TOL = 1e-4  # the parity bound: max relative error of float32 logits


def rel_err(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def randomize(hf_model: torch.nn.Module, seed: int) -> None:
    """Every weight random, norm scales included (they init to 1, which would hide a swapped
    norm). Linears get std 1/sqrt(fan_in), so attention is far from uniform and a RoPE or
    mask bug shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits for int tokens [B, L]."""
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()


def random_tokens(seed: int, shape=(2, 12), vocab: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)

"""The KV-cache sampler against independent references: `model.forward` over the whole prefix
(the cache), `transformers` greedy `generate` (tokens and log-probs), and the exact sampling
distribution computed in numpy float64 (chi-square). Shapes are tiny; every compiled function
is built once per module (the sampler caches it per bucket)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from scipy import stats
from transformers import AutoModelForCausalLM

from cascade_jax import generate, hf, model, sharding
from cascade_jax.config import ModelConfig
from cascade_jax.generate import SamplingParams

BASE = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   d_ff=48, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=64)
CASES = {
    # GQA (2 query heads per KV head), untied head, a window of 5 shorter than the sequences.
    "gqa_untied_window": (BASE.replace(sliding_window=5), "MistralForCausalLM"),
    # One KV head for 4 query heads, tied head, Llama 3.1 RoPE scaling (all three bands).
    "mqa_tied_llama3_rope": (BASE.replace(n_kv_heads=1, tie_embeddings=True,
                                          rope_scaling=(8.0, 1.0, 4.0, 16)),
                             "LlamaForCausalLM"),
}
PROMPT_LENGTHS = (3, 11, 1, 7)  # ragged: left padding of 13, 5, 15 and 9 slots in 16
NEW_TOKENS = 10
REL_TOL = 1e-5
SIGNIFICANCE = 1e-3  # chi-square: a correct sampler fails with probability 1e-3 per seed


def _randomized_params(cfg: ModelConfig, seed: int = 0) -> model.Params:
    """Random values everywhere (norm scales included) so masks and RoPE bugs show."""
    params = model.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + 0.3 * jax.random.normal(k, leaf.shape)
                                        for leaf, k in zip(leaves, keys, strict=True)])


def _prompts(cfg: ModelConfig, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _full_forward_logits(cfg, params, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """`model.forward` over every whole sequence at once (right-padded, padding in segment 0):
    row i's logits at its own positions, [len_i, V]."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    segment_ids = np.zeros_like(tokens)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)], segment_ids[i, :len(seq)] = seq, 1
    logits = np.asarray(jax.jit(model.forward, static_argnums=0)(cfg, params, tokens,
                                                                   segment_ids))
    return [logits[i, :len(seq)] for i, seq in enumerate(sequences)]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    cfg, architecture = CASES[request.param]
    return request.param, cfg, architecture, _randomized_params(cfg)


# ----------------------------------------------------------------------------- the cache


def test_cached_decode_equals_full_forward_at_every_position(case):
    """Ragged prompts left-padded into 16 slots, then 10 fed tokens one step at a time: the
    logits after every step equal the full forward over that row's prefix."""
    _, cfg, _, params = case
    prompts = _prompts(cfg)
    fed = np.random.default_rng(1).integers(0, cfg.vocab_size, (len(prompts), NEW_TOKENS))
    width = generate.prompt_bucket(max(PROMPT_LENGTHS))
    tokens = np.zeros((len(prompts), width), np.int32)
    start = np.array([width - len(p) for p in prompts], np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, start[i]:] = prompt
    logits, cache = jax.jit(model.prefill, static_argnums=(0, 4))(
        cfg, params, tokens, start, width + NEW_TOKENS)
    assert cache.k_NBMKE.shape == (cfg.n_layers, len(prompts), width + NEW_TOKENS,
                                   cfg.n_kv_heads, cfg.head_dim)
    assert cache.k_NBMKE.dtype == cfg.compute_dtype
    steps = [logits]
    decode_step = jax.jit(model.decode_step, static_argnums=0)
    for t in range(NEW_TOKENS):
        np.testing.assert_array_equal(cache.positions_B, [len(p) + t for p in prompts])
        logits, cache = decode_step(cfg, params, cache, fed[:, t])
        steps.append(logits)
    ours = np.stack(steps, axis=1)  # [B, 1 + NEW_TOKENS, V]: after the prompt, after each fed
    full = _full_forward_logits(cfg, params, [np.concatenate([p, f])
                                              for p, f in zip(prompts, fed, strict=True)])
    for i, prompt in enumerate(prompts):
        err = _rel_err(ours[i], full[i][len(prompt) - 1:])
        assert err <= REL_TOL, (i, err)


def test_padding_is_invisible_to_tokens_and_tokens_to_padding():
    mask = np.asarray(model.cache_mask(jnp.array([2, 0]), jnp.arange(4), 4, None))
    np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0],    # padding sees padding only
                                            [1, 1, 0, 0],
                                            [0, 0, 1, 0],    # tokens see tokens only
                                            [0, 0, 1, 1]])
    window = np.asarray(model.cache_mask(jnp.array([0]), jnp.array([3]), 5, 2))
    np.testing.assert_array_equal(window[0], [[0, 0, 1, 1, 0]])


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_reference(case, tmp_path_factory):
    """The case's weights written by hf.save and read by transformers."""
    name, cfg, architecture, params = case
    directory = hf.save(cfg, params, tmp_path_factory.mktemp(name) / "model",
                        architecture=architecture)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def test_greedy_equals_transformers_generate(case, hf_reference):
    """Ragged prompts, left-padded for transformers with an attention mask: the same new
    tokens, and our log-probs equal the log-softmax of transformers' raw logits."""
    _, cfg, _, params = case
    prompts = _prompts(cfg, seed=2)
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.from_numpy(prompt)
        attention_mask[i, width - len(prompt):] = 1
    with torch.no_grad():
        out = hf_reference.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True, output_logits=True)
    theirs = out.sequences[:, width:].numpy()
    their_logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).numpy()
    ours = generate.generate(cfg, params, prompts, SamplingParams(NEW_TOKENS, temperature=0))
    np.testing.assert_array_equal(ours.tokens, theirs)
    np.testing.assert_array_equal(ours.lengths, NEW_TOKENS)
    np.testing.assert_allclose(
        ours.logprobs, np.take_along_axis(their_logprobs, theirs[..., None], -1)[..., 0],
        atol=1e-4)


# ----------------------------------------------------------------------------- sampling


def _exact_distribution(logits: np.ndarray, sampling: SamplingParams) -> np.ndarray:
    """float64: softmax(logits / T), cut to the top k, renormalised, cut to the smallest
    most-likely set with mass >= p, renormalised."""
    z = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    if sampling.top_k is not None:
        probs[order[sampling.top_k:]] = 0.0
        probs /= probs.sum()
    if sampling.top_p is not None:
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < sampling.top_p
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return probs


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of the counts under `probs`; tokens expected < 5 times are pooled in one bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed_bins = np.append(counts[big], counts[~big].sum())
    expected_bins = np.append(expected[big], expected[~big].sum())
    if expected_bins[-1] == 0:
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    return float(stats.chisquare(observed_bins, expected_bins).pvalue)


@pytest.fixture(scope="module")
def sampling_model():
    cfg = CASES["gqa_untied_window"][0]
    return cfg, _randomized_params(cfg, seed=5)


@pytest.mark.parametrize("sampling", [
    SamplingParams(1, temperature=0.7, n=4000),
    SamplingParams(1, temperature=1.0, top_k=5, n=4000),
    SamplingParams(1, temperature=1.3, top_p=0.8, n=4000),
    SamplingParams(1, temperature=1.5, top_k=6, top_p=0.7, n=4000),  # top-k, then top-p
], ids=["temperature", "top_k", "top_p", "top_k_then_top_p"])
def test_sampling_frequencies_match_the_exact_distribution(sampling_model, sampling):
    """4000 draws of the first token of one prompt, in one generate call (4000 rows)."""
    cfg, params = sampling_model
    prompt = _prompts(cfg, lengths=(6,), seed=3)
    out = generate.generate(cfg, params, prompt, sampling, rng=jax.random.key(11))
    logits = _full_forward_logits(cfg, params, prompt)[0][-1]
    probs = _exact_distribution(logits, sampling)
    counts = np.bincount(out.tokens[:, 0], minlength=cfg.vocab_size)
    assert counts[probs == 0].sum() == 0  # nothing outside the top-k / nucleus, ever
    assert (probs > 0).sum() > 1          # the cut leaves a real choice
    p_value = _chi_square_p(counts, probs)
    print(f"\n[{sampling}] chi-square p = {p_value:.3f}, support {(probs > 0).sum()}")
    assert p_value > SIGNIFICANCE
    plain = _exact_distribution(logits, SamplingParams(1))  # T = 1, no cuts: must be rejected
    assert _chi_square_p(counts, plain) < SIGNIFICANCE
    untempered = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
    np.testing.assert_allclose(out.logprobs[:, 0], untempered[out.tokens[:, 0]], atol=1e-5)


SAMPLED = SamplingParams(12, temperature=1.0, n=2)


@pytest.fixture(scope="module")
def sampled(sampling_model):
    cfg, params = sampling_model
    prompts = _prompts(cfg, seed=4)
    return prompts, generate.generate(cfg, params, prompts, SAMPLED, rng=jax.random.key(3))


def test_logprobs_are_the_forward_log_softmax_at_the_sampled_tokens(sampling_model, sampled):
    cfg, params = sampling_model
    prompts, out = sampled
    rows = [p for p in prompts for _ in range(SAMPLED.n)]
    assert out.tokens.shape == out.logprobs.shape == (len(rows), SAMPLED.max_new_tokens)
    assert out.tokens.dtype == np.int32 and out.logprobs.dtype == np.float32
    np.testing.assert_array_equal(out.lengths, SAMPLED.max_new_tokens)  # no stop tokens
    logits = _full_forward_logits(cfg, params, [np.concatenate([p, t])
                                                for p, t in zip(rows, out.tokens, strict=True)])
    for i, prompt in enumerate(rows):
        ref = jax.nn.log_softmax(jnp.asarray(logits[i][len(prompt) - 1:-1]), axis=-1)
        ref = np.take_along_axis(np.asarray(ref), out.tokens[i][:, None], -1)[:, 0]
        np.testing.assert_allclose(out.logprobs[i], ref, atol=2e-5)
    # n samples of one prompt differ from each other
    assert not np.array_equal(out.tokens[0], out.tokens[1])


def test_same_rng_same_output_other_rng_other_output(sampling_model, sampled):
    cfg, params = sampling_model
    prompts, out = sampled
    again = generate.generate(cfg, params, prompts, SAMPLED, rng=jax.random.key(3))
    for field in out._fields:
        np.testing.assert_array_equal(getattr(again, field), getattr(out, field))
    other = generate.generate(cfg, params, prompts, SAMPLED, rng=jax.random.key(4))
    assert not np.array_equal(other.tokens, out.tokens)


def test_each_row_stops_at_its_own_stop_token(sampling_model, sampled):
    """The same rng with stop tokens: each row is the row without them, cut just after its
    first stop token; nothing after it is counted or kept."""
    cfg, params = sampling_model
    prompts, free = sampled
    stops = (int(free.tokens[0, 2]), int(free.tokens[3, 6]))
    out = generate.generate(cfg, params, prompts,
                            SamplingParams(12, temperature=1.0, n=2, stop_tokens=stops),
                            rng=jax.random.key(3))
    expected_lengths = []
    for row in free.tokens:
        hits = np.flatnonzero(np.isin(row, stops))
        expected_lengths.append(hits[0] + 1 if hits.size else len(row))
    np.testing.assert_array_equal(out.lengths, expected_lengths)
    assert len(set(expected_lengths)) > 2  # rows stopped at different steps
    for i, length in enumerate(expected_lengths):
        np.testing.assert_array_equal(out.tokens[i, :length], free.tokens[i, :length])
        np.testing.assert_allclose(out.logprobs[i, :length], free.logprobs[i, :length])
        assert not out.tokens[i, length:].any() and not out.logprobs[i, length:].any()


# ----------------------------------------------------------------------------- mesh, buckets


def test_sharded_generation_equals_one_device(sampling_model, sampled):
    cfg, params = sampling_model
    prompts, single = sampled
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    on_mesh = generate.generate(cfg, params, prompts, SAMPLED, rng=jax.random.key(3), mesh=mesh)
    np.testing.assert_array_equal(on_mesh.tokens, single.tokens)
    np.testing.assert_array_equal(on_mesh.lengths, single.lengths)
    np.testing.assert_allclose(on_mesh.logprobs, single.logprobs, atol=1e-5)
    # the cache's KV heads are split over tensor, its rows over data × fsdp
    sampler = generate._sampler(cfg, mesh, 8, 16, dataclasses.replace(SAMPLED, n=1))
    state = sampler.prefill(sharding.shard_like(params, sampler.param_shardings),
                            np.zeros((8, 16), np.int32), np.full(8, 15, np.int32),
                            np.ones(8, bool), jax.random.key(0))
    assert state.cache.k_NBMKE.sharding.spec == PartitionSpec(None, ("data", "fsdp"), None,
                                                              "tensor", None)


def test_compiled_decode_is_reused_within_a_bucket(sampling_model):
    """Two calls with other prompt lengths and row counts in the same buckets (16 slots,
    4 rows): the second compiles nothing."""
    cfg, params = sampling_model
    compiles = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    greedy = SamplingParams(4, temperature=0)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = generate.generate(cfg, params, _prompts(cfg, (5, 9, 2)), greedy)
        first_compiles = len(compiles)
        second = generate.generate(cfg, params, _prompts(cfg, (13, 1, 16, 4)), greedy)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first_compiles >= 2  # prefill and decode (the listener sees compilations)
    assert len(compiles) == first_compiles
    assert first.tokens.shape == (3, 4) and second.tokens.shape == (4, 4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be an integer >= 1"),
    ({"max_new_tokens": 4, "temperature": -0.5}, "temperature=-0.5 must be a finite number"),
    ({"max_new_tokens": 4, "top_k": 0}, "top_k=0 must be an integer >= 1"),
    ({"max_new_tokens": 4, "top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"max_new_tokens": 4, "n": 0}, "n=0 must be an integer >= 1"),
    ({"max_new_tokens": 4, "stop_tokens": (2, -1)}, r"stop_tokens=\(2, -1\) must be token ids"),
])
def test_bad_sampling_params_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_clear_errors(sampling_model):
    cfg, params = sampling_model
    greedy = SamplingParams(60, temperature=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] has 5 tokens: with max_new_tokens=60 "
                                         r"that is 65 positions, beyond cfg.max_seq_len=64; "
                                         r"shorten the prompt to 4 tokens"):
        generate.generate(cfg, params, _prompts(cfg, (4, 5)), greedy)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token 96, outside the vocabulary"):
        generate.generate(cfg, params, [np.array([1, 96])], greedy)
    with pytest.raises(ValueError, match=r"prompts\[0\] has shape \(0,\)"):
        generate.generate(cfg, params, [np.array([], np.int32)], greedy)
    with pytest.raises(ValueError, match=r"temperature=1\.0 samples: pass rng="):
        generate.generate(cfg, params, _prompts(cfg, (3,)), SamplingParams(4))

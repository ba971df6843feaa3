"""CLEAR's layer search finds the block where a planted concept is separable; SAE and masks behave."""

from __future__ import annotations

import pytest
import torch
from clear_helpers import PlantedEncoder

from erasure_core.clear import ClearConfig, SparseAutoencoder, fit_clear
from erasure_core.clear.sae import feature_masks, soft_separability, topk_relu
from erasure_core.errors import FitError
from erasure_core.prompts import ConceptRequest

REQUEST = ConceptRequest.create("zebra", anchor="horse", preset="object")
CONFIG = ClearConfig(finetune_steps=50, background=0)


def test_search_finds_the_planted_block_in_9_of_10_seeds():
    found = []
    for seed in range(10):
        enc = PlantedEncoder(seed)
        fit = fit_clear(enc, REQUEST, config=CONFIG, seed=seed)
        found.append(fit.targets[0].module.block)
    assert sum(b == 3 for b in found) >= 9, found


def test_fit_records_trajectory_separability_and_unit_decoder():
    enc = PlantedEncoder(0)
    fit = fit_clear(enc, REQUEST, config=CONFIG, seed=0)
    t = fit.targets[0]
    assert t.layer_probs.shape[1] == 6 and t.layer_probs.shape[0] == len(t.steps) == len(t.tau)
    torch.testing.assert_close(t.layer_probs.sum(1), torch.ones(len(t.steps)))
    assert t.tau[0] == pytest.approx(5.0) and t.tau[-1] == pytest.approx(0.1)
    assert int(torch.argmax(t.separability)) == 3
    m = t.module
    torch.testing.assert_close(m.W_dec.norm(dim=0), torch.ones(m.W_dec.shape[1]), rtol=1e-4, atol=1e-4)
    assert m.W_enc.shape == (8 * 16, 16) and m.topk == 8
    assert 0 < int(m.mask.sum()) < m.mask.numel()
    assert m.scale == pytest.approx(float(t.scales[3]))
    summary = t.summary()
    assert summary["block"] == 3 and len(summary["layer_scales"]) == 6


def test_fit_is_deterministic_under_a_seed():
    cfg = ClearConfig(search_steps=40, finetune_steps=10, background=0)
    a = fit_clear(PlantedEncoder(1), REQUEST, config=cfg, seed=7).targets[0]
    b = fit_clear(PlantedEncoder(1), REQUEST, config=cfg, seed=7).targets[0]
    assert torch.equal(a.layer_probs, b.layer_probs)
    assert torch.equal(a.module.W_enc, b.module.W_enc) and torch.equal(a.module.mask, b.module.mask)


def test_progress_is_reported_and_can_interrupt():
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done > 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_clear(PlantedEncoder(0), REQUEST, config=CONFIG, seed=0, progress=progress)
    assert calls[0][0] == 0 and all(t == calls[0][1] for _, t in calls)


def test_topk_keeps_k_features_and_decoder_stays_unit_norm():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(8, 32, topk=3, generator=g)
    x = torch.randn(50, 8, generator=g)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 3).all() and (f >= 0).all()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(x).backward()
        opt.step()
        sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(32))
    assert torch.equal(topk_relu(torch.tensor([[3.0, -1.0, 2.0, 1.0]]), 2), torch.tensor([[3.0, 0.0, 2.0, 0.0]]))


def test_masks_from_firing_rates():
    sae = SparseAutoencoder(4, 4, topk=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x_pos = torch.tensor([[1.0, 0, 0, 1], [1.0, 0, 0, 1], [0, 0, 1.0, 0]])
    x_neg = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]])
    m = feature_masks(sae, x_pos, x_neg, eps_shared=0.0, eps_specific=0.1)
    assert m.shared.tolist() == [True, False, True, False]
    assert m.specific.tolist() == [False, False, False, True]
    torch.testing.assert_close(m.phi_pos, torch.tensor([2 / 3, 0, 1 / 3, 2 / 3]))


def test_soft_loss_is_differentiable_in_both_sets_and_prefers_separation():
    f_pos = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    f_neg = torch.tensor([[0.0, 1.0], [0.5, 1.0]], requires_grad=True)
    loss, s_spe, s_uni = soft_separability(f_pos, f_neg)
    loss.backward()
    assert f_pos.grad.abs().sum() > 0 and f_neg.grad.abs().sum() > 0
    separated, _, _ = soft_separability(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert float(separated) == pytest.approx(0.0) and float(loss.detach()) > 0


def test_bad_options_are_refused():
    with pytest.raises(FitError, match="needs l1 > 0"):
        ClearConfig(topk=0)
    with pytest.raises(FitError, match="candidate blocks"):
        fit_clear(PlantedEncoder(0), REQUEST, config=ClearConfig(blocks=(7,)))

# ---- mad.py: the network, masked training, matching, masked inference (issue 3) ----
import math

import pytest
import torch

import mad
from mad import MAD, PRESETS, Config, Vocab


def tiny_model(decoder="mad", **over):
    torch.manual_seed(0)
    cfg = Config(**{**PRESETS["tiny"], "dropout": 0.0, "decoder": decoder, **over})
    vocab = Vocab(num_classes=5, num_bins=cfg.num_bins, num_text=40, person=0)
    return MAD(cfg, vocab).eval()


def random_batch(model, B=2, size=128, n_gt=3):
    """A batch of the shapes data.collate produces, with random but well-formed tokens."""
    cfg, v = model.cfg, model.vocab
    Q, S, M = cfg.num_queries, cfg.max_instances, cfg.mask_size
    g = torch.Generator().manual_seed(1)
    coords = lambda *s: torch.randint(v.coord, v.coord + v.num_bins + 1, s, generator=g)
    det_seq = torch.cat([coords(B, Q, 4), torch.randint(v.cls, v.noise, (B, Q, 1), generator=g)], -1)
    prompt = lambda tok: torch.cat([torch.full((B, S, 1), tok), det_seq[:, :S]], -1)
    return dict(
        images=torch.randn(B, 3, size, size, generator=g), pad_mask=torch.zeros(B, size, size, dtype=torch.bool),
        det_seq=det_seq, det_gt=[det_seq[b, :n_gt].clone() for b in range(B)],
        seg_prompt=prompt(v.seg), seg_seq=torch.randint(v.fg, v.bg + 1, (B, S, M * M), generator=g),
        seg_weight=torch.ones(B, S, M * M),
        kpt_prompt=prompt(v.kpt), kpt_seq=coords(B, S, 51), kpt_weight=torch.ones(B, S, 51),
        cap_seq=torch.randint(v.text, v.size, (B, 5, cfg.caption_len), generator=g),
        cap_weight=torch.ones(B, 5, cfg.caption_len),
        size=torch.tensor([[size, size]] * B), orig_size=torch.tensor([[2 * size, 3 * size]] * B))


def test_decoder_is_bidirectional_and_sequences_do_not_leak():
    model = tiny_model()
    batch = random_batch(model)
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["pad_mask"])
        tokens = torch.randint(0, model.vocab.size, (2, 3, 30))
        base = model.decode(tokens, enc)                                     # (B, n, L, d)
        last = tokens.clone()
        last[0, 1, -1] = (last[0, 1, -1] + 1) % model.vocab.size            # only the last token of seq 1
        changed = model.decode(last, enc)
        other = tokens.clone()
        other[0, 2] = torch.randint(0, model.vocab.size, (30,))              # another sequence, same image
        leaked = model.decode(other, enc)
    assert (changed[0, 1, 0] - base[0, 1, 0]).abs().max() > 1e-4            # first position sees the last
    assert torch.allclose(leaked[0, :2], base[0, :2], atol=1e-6)            # seqs 0, 1 unchanged


def test_folded_cross_attention_equals_decoding_each_sequence_alone():
    model = tiny_model()
    batch = random_batch(model)
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["pad_mask"])
        tokens = torch.randint(0, model.vocab.size, (2, 4, 26))
        together = model.decode(tokens, enc)
        alone = torch.stack([model.decode(tokens[:, i:i + 1], enc)[:, 0] for i in range(4)], 1)
    assert torch.allclose(together, alone, atol=1e-5)


def test_restricted_vocabulary_equals_full_vocabulary_masked_to_minus_inf():
    model = tiny_model()
    h = torch.randn(7, model.cfg.d_model)
    v = model.vocab
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.head(h), dim=-1)
        full = z @ torch.nn.functional.normalize(model.embed.weight, dim=-1).t() * model.logit_scale.exp()
        for task in mad.TASKS:
            lo, hi = v.task_range(task)
            masked = torch.full_like(full, float("-inf"))
            masked[:, lo:hi] = full[:, lo:hi]
            assert torch.allclose(model.logits(h, task).softmax(-1), masked.softmax(-1)[:, lo:hi], atol=1e-6)


def det_logp(v, Q, B=1, layers=1, c=1):
    """Uniform log-probs over the detection range, shaped (layers, B, c, 5Q, V)."""
    lo, hi = v.task_range("det")
    return torch.full((layers, B, c, 5 * Q, hi - lo), -math.log(hi - lo))


def test_matcher_finds_the_known_best_assignment():
    v = Vocab(5, 50, 10)
    Q, lo = 6, v.task_range("det")[0]
    gt = torch.tensor([[v.coord + 1, v.coord + 2, v.coord + 3, v.coord + 4, v.cls + 0],
                       [v.coord + 10, v.coord + 11, v.coord + 12, v.coord + 13, v.cls + 3]])
    logp = det_logp(v, Q)
    best = {4: 0, 1: 1}                                                      # slot -> object
    for slot, obj in best.items():
        for j in range(5):
            logp[0, 0, 0, slot * 5 + j, gt[obj, j] - lo] = 0.0              # certain of that object
    masked = torch.ones(1, 1, 5 * Q, dtype=torch.bool)
    inputs = torch.full((1, 1, 5 * Q), v.mask)
    target, weight = mad.match_detections(logp, inputs, masked, [gt], v)
    target, weight = target.view(Q, 5), weight.view(Q, 5)
    for slot, obj in best.items():
        assert (target[slot] == gt[obj] - lo).all() and (weight[slot] == 1).all()
    for slot in set(range(Q)) - set(best):                                   # unmatched -> <noise>
        assert target[slot, 4] == v.noise - lo
        assert (weight[slot, :4] == 0).all() and weight[slot, 4] == 1


def test_matcher_visible_tokens_force_the_match_batched_equals_per_image_and_empty_targets():
    v = Vocab(5, 50, 10)
    Q, lo = 5, v.task_range("det")[0]
    g = torch.Generator().manual_seed(0)
    gts = [torch.cat([torch.randint(v.coord, v.coord + 51, (n, 4), generator=g),
                      torch.randint(v.cls, v.noise, (n, 1), generator=g)], 1) for n in (3, 0, 2)]
    logp = torch.randn(2, 3, 2, 5 * Q, v.vis - lo, generator=g).log_softmax(-1)
    masked = torch.rand(3, 2, 5 * Q, generator=g) < 0.7
    masked[:, 0] = True                                                      # copy 0 fully masked
    inputs = torch.where(masked, v.mask, torch.randint(v.cls, v.vis, (3, 2, 5 * Q), generator=g))
    inputs[0, 1, 15:20] = gts[0][1]                                          # slot 3 shows object 1 ...
    masked[0, 1, 15:20] = torch.tensor([False, True, False, True, False])   # ... partly visible
    target, weight = mad.match_detections(logp, inputs, masked, gts, v)
    assert (target[:, 0, 1, 15:20] == gts[0][1] - lo).all()                  # in every layer
    for b in range(3):                                                       # batched == per image
        t1, w1 = mad.match_detections(logp[:, b:b + 1], inputs[b:b + 1], masked[b:b + 1], gts[b:b + 1], v)
        assert torch.equal(t1[:, 0], target[:, b]) and torch.equal(w1[:, 0], weight[:, b])
    assert (weight[:, 1].view(2, 2, Q, 5)[..., :4] == 0).all()              # no objects: all <noise>
    assert (target[:, 1].view(2, 2, Q, 5)[..., 4] == v.noise - lo).all()
    assert (weight[:, 0].view(2, 2, Q, 5)[..., 0].sum(-1) == 3).all()        # every object matched once


def test_masking_hides_exactly_round_ratio_n():
    for L in (5, 20, 57, 262, 500):
        m = mad.random_mask((4, 3, L), 0.7, "cpu")
        assert (m.sum(-1) == round(0.7 * L)).all()
    assert not torch.equal(mad.random_mask((1, 1, 500), 0.7, "cpu"), mad.random_mask((1, 1, 500), 0.7, "cpu"))


@pytest.mark.parametrize("task", ["det", "seg", "cap"])
def test_loss_ignores_logits_of_unmasked_positions(task, monkeypatch):
    model = tiny_model()
    batch = random_batch(model)
    enc = model.encode(batch["images"], batch["pad_mask"])
    seen = {}

    def fake_random_mask(shape, ratio, device):                              # fixed, recorded mask
        seen["mask"] = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < ratio
        return seen["mask"]

    def fake_decode(prompt, inputs, enc, task):                              # fixed log-probs (+ a bump)
        lo, hi = model.vocab.task_range(task)
        g = torch.Generator().manual_seed(4)
        logp = torch.randn(2, *inputs.shape, hi - lo, generator=g) + seen.get("bump", 0)
        return logp.log_softmax(-1)

    monkeypatch.setattr(mad, "random_mask", fake_random_mask)
    monkeypatch.setattr(model, "decode_task", fake_decode)
    loss = lambda: getattr(model, f"{task}_loss")(batch, enc)[0]              # summed CE per layer
    base = loss()
    n_full = 1 if task != "seg" else model.cfg.max_instances
    visible = torch.cat([torch.zeros_like(seen["mask"][:, :n_full]), ~seen["mask"]], 1)   # (B, 1+n, L)
    lo, hi = model.vocab.task_range(task)
    seen["bump"] = torch.randn(*visible.shape, hi - lo) * 5 * visible[..., None]   # unmasked logits only
    assert torch.allclose(loss(), base, atol=1e-5)
    seen["bump"] = torch.randn(*visible.shape, hi - lo) * ~visible[..., None]   # masked ones: must change
    assert not torch.allclose(loss(), base, atol=1e-3)


def test_ar_greedy_decoding_with_kv_cache_equals_without():
    model = tiny_model("ar")
    batch = random_batch(model)
    v = model.vocab
    with torch.no_grad():
        enc = model.encode(batch["images"], batch["pad_mask"])
        for task, L, prompt in [("det", 40, v.det_prompt.expand(2, 1, 6)), ("kpt", 51, batch["kpt_prompt"][:, :2]),
                                ("cap", 20, v.cap_prompt.expand(2, 1, 6))]:
            cached, plain = model.generate(prompt, L, enc, task), model.generate(prompt, L, enc, task, use_cache=False)
            assert torch.equal(cached.argmax(-1), plain.argmax(-1))
            assert torch.allclose(cached, plain, atol=1e-5)


def test_one_training_step_and_prediction_shapes_for_both_decoders():
    for decoder in ("mad", "ar"):
        model = tiny_model(decoder).train()
        batch = random_batch(model)
        loss, parts = model(batch)
        loss.backward()
        assert set(parts) == set(mad.TASKS) and torch.isfinite(loss)
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), decoder
        out = model.eval().predict(batch["images"], batch["pad_mask"], batch["size"], batch["orig_size"])
        check_prediction(out, model, batch)


def check_prediction(out, model, batch):
    Q, (H, W) = model.cfg.num_queries, batch["orig_size"][0].tolist()
    assert len(out) == len(batch["images"])
    for o in out:
        assert o["boxes"].shape == (Q, 4) and o["scores"].shape == (Q,) and o["labels"].shape == (Q,)
        assert (o["scores"][:-1] >= o["scores"][1:]).all()                  # sorted
        assert (o["boxes"][:, :2] <= o["boxes"][:, 2:]).all()
        assert (o["boxes"][:, 2] <= W).all() and (o["boxes"][:, 3] <= H).all()
        assert o["masks"].shape == (min(model.cfg.seg_topk, Q), H, W) and o["masks"].dtype == torch.bool
        P = len(o["kpt_index"])
        assert o["keypoints"].shape == (P, 17, 3) and (o["labels"][o["kpt_index"]] == model.vocab.person).all()
        assert o["caption_ids"].shape == (model.cfg.caption_len,)


def test_r50_default_training_step_and_predict_at_800x1333():
    torch.manual_seed(0)
    cfg = Config(**PRESETS["r50"])
    vocab = Vocab(num_classes=80, num_bins=cfg.num_bins, num_text=1000, person=0)
    model = MAD(cfg, vocab)
    assert 40e6 < sum(p.numel() for p in model.parameters()) < 50e6
    batch = random_batch(model, B=1, size=800, n_gt=7)
    batch["images"] = torch.randn(1, 3, 800, 1344)                          # 1333 padded to 32
    batch["pad_mask"] = torch.zeros(1, 800, 1344, dtype=torch.bool)
    batch["pad_mask"][:, :, 1333:] = True
    batch["size"], batch["orig_size"] = torch.tensor([[800, 1333]]), torch.tensor([[480, 800]])
    loss, _ = model.train()(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone[0].weight.grad is None                             # frozen stem
    out = model.eval().predict(batch["images"], batch["pad_mask"], batch["size"], batch["orig_size"])
    check_prediction(out, model, batch)


def test_paste_masks_fills_the_box_only():
    prob = torch.ones(2, 16, 16)
    prob[1, :, 8:] = 0                                                       # left half foreground
    m = mad.paste_masks(prob, torch.tensor([[10., 20., 50., 60.], [0., 0., 40., 40.]]), 80, 100)
    assert m[0, 20:60, 10:50].all() and m[0].sum() == 40 * 40
    assert m[1, :40, :19].all() and not m[1, :, 21:].any()


# ---- backbones and pretrained weights (issue 7) ----

@pytest.mark.parametrize("name,channels", [("tiny", 256), ("r50", 2048), ("swin_b", 1024), ("vit_b", 768)])
def test_backbone_stride_32_map_and_local_weights_round_trip(name, channels, tmp_path):
    torch.manual_seed(0)
    backbone, c = mad.BACKBONES[name]()
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        y = backbone.eval()(x)
    assert c == channels and y.shape == (1, channels, 4, 6)
    if name == "tiny":
        return
    torch.save(backbone.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    other, _ = mad.BACKBONES[name]()
    mad.load_backbone_weights(other, name, str(tmp_path / "w.pt"))
    with torch.no_grad():
        assert torch.equal(other.eval()(x), y)


def test_offline_pretrained_gives_a_clear_message(monkeypatch):
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    backbone, _ = mad.BACKBONES["r50"]()
    with pytest.raises(SystemExit, match="--backbone-weights PATH"):
        mad.load_backbone_weights(backbone, "r50")
    with pytest.raises(SystemExit, match="cannot read a state dict"):
        mad.load_backbone_weights(backbone, "r50", "/nonexistent/weights.pt")


@pytest.mark.parametrize("name", ["r50", "swin_b", "vit_b"])
def test_training_step_with_each_backbone(name):
    """The full model (paper widths) with each backbone, one step at a reduced image size."""
    torch.manual_seed(0)
    cfg = Config(**{**PRESETS[name], "num_queries": 20, "dropout": 0.0})
    model = MAD(cfg, Vocab(num_classes=80, num_bins=cfg.num_bins, num_text=100, person=0)).train()
    batch = random_batch(model, B=1, size=160)
    loss, parts = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-4:])

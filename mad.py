"""Masked AutoDecoder (MAD): one network for detection, segmentation, keypoints and captions.

Paper: "Masked AutoDecoder is Effective Multi-Task Vision Generalist" (Qiu et al., CVPR 2024).
This file holds the model side of the method, in the order the paper explains it:
  3.1 vocabulary and caption tokenizer   (data.py builds the token sequences with them)
  3.3 backbone, encoder, bi-directional decoder, token head
  3.2 masked training: masking, Hungarian matching, losses
  3.2 masked inference: detection -> segmentation/keypoints -> captions
  B   the autoregressive baseline (same network, causal decoder)
train.py trains it, evaluate.py scores it, bench.py times it.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment


# -----------------------------------------------------------------------------
# Configuration: paper defaults (4.1, Table 9); presets in PRESETS.

@dataclass
class Config:
    backbone: str = "r50"            # tiny | r50 | swin_b | swin_b384 | vit_b
    d_model: int = 256               # width of encoder and decoder
    enc_layers: int = 6
    dec_layers: int = 6
    heads: int = 8
    ffn: int = 2048                  # width of the feed-forward layers
    dropout: float = 0.1
    num_queries: int = 100           # detection slots per image (N in 3.1)
    num_bins: int = 500              # coordinate quantization bins (Table 5)
    mask_size: int = 16              # segmentation bit mask is mask_size x mask_size (Table 6)
    max_instances: int = 10          # segmentation / keypoint instances per image in training
    caption_len: int = 20            # caption tokens, eos and padding included
    max_captions: int = 5            # reference captions per image
    mask_ratio: float = 0.7          # share of tokens masked in the partly masked copy (Table 4)
    mask_strategy: str = "fixed"     # Table 3: fixed (mask_ratio) | random (a ratio per sequence, uniform in
                                     # [0.6, 0.8]) | multiple (two partly masked copies, at 0.6 and 0.8)
    cap_full_word: bool = True       # one random text token in the fully masked caption copy too (authors' code;
                                     # bbox AP +0.9 / +1.8, BLEU-4 +3.3 / -5.8 on two seeds here)
    tasks: tuple = ("det", "seg", "kpt", "cap")   # the tasks trained and evaluated (Table 8: one alone)
    task_weights: tuple = (1.5, 2.7, 0.5, 0.3)   # det, seg, kpt, cap (supplementary C)
    decoder: str = "mad"             # mad (bi-directional, parallel) | ar (autoregressive baseline)
    kpt_ratios: tuple = (1.0,)       # masked inference: mask ratio of each stage (keypoints: one, as the authors'
                                     # configs; the paper's 0.7 stage: AP +0.2 / 0.0 / -0.1 on three models here)
    cap_ratios: tuple = (1.0, 0.8, 0.6, 0.4)
    remask_average: str = "running"  # re-masked logits join a running mean | "halve": (ensemble + new) / 2, the
                                     # authors' (BLEU-4 -0.1, -0.2, -2.2 on three models here)
    det_score: str = "all"           # score = p(class) with the softmax over every detection token (SPEC) |
                                     # "classes": over classes + <noise> only (bbox AP within 0.1 on three models)
    seg_topk: int = 100              # detections that prompt segmentation / keypoints
    sine_coords: bool = True         # coordinate token embeddings start as sine codes of their bin
    xavier: bool = True              # xavier_uniform_ init of the encoder/decoder weight matrices (authors' code)
    image_size: int = 800            # shorter side at test time (longer side <= max_size)
    max_size: int = 1333


PRESETS = {
    "r50": dict(backbone="r50"),
    "swin_b": dict(backbone="swin_b"),
    "swin_b384": dict(backbone="swin_b384"),          # the paper's window 12; no torchvision weights
    "vit_b": dict(backbone="vit_b", image_size=1024, max_size=1024),
    # small enough to train on 2 CPU cores in minutes (train.py --demo, tests). CPU-sized: no dropout
    # (on the CPU, attention dropout falls back to the slow math kernel); 8 x 8 masks (16 x 16 makes
    # segmentation 4x the rest of the step; Table 6: 12..20 all work); 10 slots for the synthetic
    # images' 1-4 objects; 2 segmentation / keypoint instances and 3 captions sampled per image and
    # step (as the paper samples 10 instances), which cuts the padded sequences a batch decodes:
    # 1.64x the images/s on 2 cores (11.9 -> 19.5 at batch 8)
    "tiny": dict(backbone="tiny", d_model=128, enc_layers=2, dec_layers=3, heads=4, ffn=512, dropout=0.0,
                 num_queries=10, num_bins=128, mask_size=8, max_instances=2, max_captions=3, image_size=128,
                 max_size=128),
}

TASKS = ("det", "seg", "kpt", "cap")


# -----------------------------------------------------------------------------
# 3.1 Task tokenization: one shared vocabulary

class Vocab:
    """Token id layout of the one shared vocabulary (SPEC 3).

    Specials: 6 detection prompts, <seg>, <kpt>, 6 caption prompts, <mask>, <start>, <end>.
    Then classes, <noise>, num_bins+1 coordinates, <vis>, <invis>, <fg>, <bg>, text pieces.
    The order is chosen so that every task's allowed tokens form one contiguous range
    (task_range): the token head scores a slice of the embedding table and a target's
    index within its task is simply `token - lo`.
    """

    def __init__(self, num_classes, num_bins, num_text, person=-1):
        self.num_classes, self.num_bins, self.num_text = num_classes, num_bins, num_text
        self.person = person                          # class index of "person" (keypoints), -1 if none
        self.det_prompt = torch.arange(0, 6)          # the 6 detection prompt tokens
        self.seg, self.kpt = 6, 7                     # segmentation / keypoint task tokens
        self.cap_prompt = torch.arange(8, 14)         # the 6 caption prompt tokens
        self.mask, self.start, self.end = 14, 15, 16
        self.cls = 17                                 # class c is token cls + c
        self.noise = self.cls + num_classes           # "not an object"
        self.coord = self.noise + 1                   # bin b is token coord + b, b in [0, num_bins]
        self.vis = self.coord + num_bins + 1
        self.invis = self.vis + 1
        self.fg = self.vis + 2
        self.bg = self.vis + 3
        self.text = self.vis + 4                      # SentencePiece id i is token text + i
        self.size = self.text + num_text

    def task_range(self, task):
        """(lo, hi): the task predicts only tokens lo..hi-1 (3.4, vocabulary filtering)."""
        return {"det": (self.cls, self.vis),          # classes, <noise>, coordinates
                "seg": (self.fg, self.bg + 1),        # <fg>, <bg>
                "kpt": (self.coord, self.invis + 1),  # coordinates, <vis>, <invis>
                "cap": (self.text, self.size)}[task]

    def quantize(self, v):
        """Coordinates normalized to [0, 1] -> coordinate tokens: floor(v * bins), clamped."""
        return self.coord + (v * self.num_bins).floor().clamp(0, self.num_bins).long()

    def dequantize(self, t):
        """Coordinate tokens -> bin centres in [0, 1] (the authors use t / bins: half a bin low)."""
        return ((t - self.coord).float() + 0.5).div(self.num_bins).clamp(0, 1)

    def state_dict(self):
        return dict(num_classes=self.num_classes, num_bins=self.num_bins, num_text=self.num_text,
                    person=self.person)


class CaptionTokenizer:
    """SentencePiece captions <-> fixed-length rows of piece ids (pad=0, eos=1, unk=2).

    Ids here are SentencePiece ids; add Vocab.text to get vocabulary tokens.
    Built from the model's bytes, which checkpoints store, so nothing else is needed later.
    """
    pad, eos, unk = 0, 1, 2

    def __init__(self, model_bytes):
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, captions, length):
        """list of n strings -> LongTensor (n, length): lower-cased pieces, eos, then pad."""
        rows = torch.full((len(captions), length), self.pad, dtype=torch.long)
        for i, ids in enumerate(self.sp.encode([c.lower() for c in captions])):
            ids = ids[: length - 1] + [self.eos]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows

    def decode(self, ids):
        """One row of piece ids -> string, cut at the first eos or pad."""
        ids = list(ids)
        for stop in (self.eos, self.pad):
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return self.sp.decode(ids)


# -----------------------------------------------------------------------------
# 3.3 Architecture: backbone -> 1x1 projection + sine positions -> encoder -> decoder -> head

def tiny_backbone():
    """A small stride-32 CNN for tests and the CPU demo. GroupNorm, not BatchNorm, so a sample's
    features do not depend on the rest of its batch (DDP with batch 1 per rank == one batch of 2)."""
    layers, c_in = [], 3
    for c in (32, 64, 128, 192, 256):
        layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.GroupNorm(8, c), nn.ReLU(inplace=True),
                   nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.GroupNorm(8, c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers), c_in


def resnet50_backbone():
    """torchvision ResNet-50 up to layer4 (stride 32, 2048 channels), frozen BatchNorm, frozen stem.
    Parameter names are torchvision's, so its ImageNet state dict loads as it is."""
    r = torchvision.models.resnet50(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    r.conv1.requires_grad_(False)
    return nn.Sequential(OrderedDict((n, getattr(r, n)) for n in names)), 2048


class SwinB(nn.Module):
    """torchvision Swin-B features (stride 32, 1024 channels), returned channels-first. window=7 is
    torchvision's (224 px ImageNet weights); window=12 is the paper's (384 px pretraining), whose
    relative position tables torchvision's weights do not fit."""

    def __init__(self, window=7):
        super().__init__()
        swin = torchvision.models.swin_transformer.SwinTransformer(
            patch_size=[4, 4], embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
            window_size=[window, window], stochastic_depth_prob=0.5)        # torchvision's swin_b at window 7
        self.features, self.norm = swin.features, swin.norm

    def forward(self, x):
        return self.norm(self.features(x)).permute(0, 3, 1, 2)                 # (B, 1024, H/32, W/32)


class ViTDetB(nn.Module):
    """ViT-B/16 as the paper uses it (supplementary A, after ViTDet): torchvision's blocks, so that its
    ImageNet weights load, with attention inside 14 x 14 windows except in blocks 2, 5, 8 and 11
    (global), drop-path rising to 0.1 over the blocks, and a simple pyramid neck to stride 32:
    2 x 2 max-pool, 1 x 1 conv, LayerNorm, 3 x 3 conv, LayerNorm (new weights). Position embeddings
    (trained at 224 px) are interpolated to the patch grid. Left out: ViTDet's relative position
    biases and EVA-02's RoPE and SwiGLU, and the fixed 1024 canvas (images are padded to a multiple
    of 32, as for the other backbones)."""

    def __init__(self, window=14, global_blocks=(2, 5, 8, 11), drop_path=0.1):
        super().__init__()
        vit = torchvision.models.vit_b_16()
        self.conv_proj, self.encoder = vit.conv_proj, vit.encoder
        self.window, self.global_blocks = window, set(global_blocks)
        n = len(self.encoder.layers)
        self.drop = nn.ModuleList(torchvision.ops.StochasticDepth(drop_path * i / (n - 1), "row") for i in range(n))
        LayerNorm2d = torchvision.models.convnext.LayerNorm2d
        self.neck = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(768, 256, 1, bias=False), LayerNorm2d(256),
                                  nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))

    def forward(self, x):
        x = self.conv_proj(x)                                                  # (B, 768, h, w), stride 16
        B, C, h, w = x.shape
        pos = self.encoder.pos_embedding[:, 1:]                                # drop the class token's
        g = math.isqrt(pos.shape[1])
        pos = F.interpolate(pos.reshape(1, g, g, C).permute(0, 3, 1, 2), size=(h, w), mode="bicubic")
        x = (x + pos).permute(0, 2, 3, 1)                                      # (B, h, w, 768)
        for i, (block, drop) in enumerate(zip(self.encoder.layers, self.drop)):
            if i in self.global_blocks:
                x = vit_block(block, x.flatten(1, 2), drop).view(B, h, w, C)
            else:
                x = self.windowed(block, x, drop)
        return self.neck(self.encoder.ln(x).permute(0, 3, 1, 2))              # (B, 256, H/32, W/32)

    def windowed(self, block, x, drop):
        """The block inside non-overlapping windows: (B, h, w, C) padded to whole windows."""
        B, h, w, C = x.shape
        s = self.window
        x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
        H, W = x.shape[1:3]
        x = x.view(B, H // s, s, W // s, s, C).transpose(2, 3).reshape(-1, s * s, C)   # (B * windows, s*s, C)
        x = vit_block(block, x, drop).view(B, H // s, W // s, s, s, C).transpose(2, 3).reshape(B, H, W, C)
        return x[:, :h, :w]


def vit_block(block, x, drop):
    """torchvision's ViT EncoderBlock on x (N, L, C), with drop-path on both residual branches."""
    y = block.ln_1(x)
    y = block.self_attention(y, y, y, need_weights=False)[0]
    x = x + drop(block.dropout(y))
    return x + drop(block.mlp(block.ln_2(x)))


BACKBONES = {"tiny": tiny_backbone, "r50": resnet50_backbone, "swin_b": lambda: (SwinB(), 1024),
             "swin_b384": lambda: (SwinB(window=12), 1024), "vit_b": lambda: (ViTDetB(), 256)}
IMAGENET_WEIGHTS = {"r50": "ResNet50_Weights", "swin_b": "Swin_B_Weights", "vit_b": "ViT_B_16_Weights"}
NEW_PARTS = ("neck.",)                # backbone parts that ImageNet classifiers do not have


def load_backbone_weights(backbone, name, path=None):
    """ImageNet weights into `backbone`: from a local state-dict file when `path` is given, else
    through torchvision's weights API (downloads once into the torch hub cache)."""
    if path:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--backbone-weights {path}: cannot read a state dict ({e})") from None
    elif name not in IMAGENET_WEIGHTS:
        raise SystemExit(f"--pretrained: torchvision has no ImageNet weights for backbone '{name}'"
                         + (": pass --backbone-weights PATH, a Swin-B (window 12, 384 px) state dict in torchvision's "
                            "key layout" if name == "swin_b384" else ""))
    else:
        weights = getattr(torchvision.models, IMAGENET_WEIGHTS[name]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            raise SystemExit(f"--pretrained: could not fetch torchvision's {weights} ({type(e).__name__}: {e}). "
                             f"Without a network, pass --backbone-weights PATH (a state dict of torchvision's "
                             f"model, saved where it can be downloaded) or omit --pretrained.") from None
    missing, _ = backbone.load_state_dict(state, strict=False)   # the classifier head is not ours
    missing = [k for k in missing if not k.startswith(NEW_PARTS)]
    if missing:
        raise SystemExit(f"backbone weights for '{name}' lack {len(missing)} tensors, e.g. {missing[:3]}")


def sine_positions(pad_mask, d):
    """2-D sine position encoding, normalized to the unpadded image (as DETR).
    pad_mask (B, h, w) True at padding -> (B, h*w, d)."""
    inside = (~pad_mask).float()
    y = inside.cumsum(1) / (inside.cumsum(1)[:, -1:, :] + 1e-6) * 2 * math.pi    # (B, h, w) in (0, 2pi]
    x = inside.cumsum(2) / (inside.cumsum(2)[:, :, -1:] + 1e-6) * 2 * math.pi
    freq = 10000 ** (2 * (torch.arange(d // 4, device=pad_mask.device) / (d // 2)))   # (d/4,)
    def enc(v):                                                                     # (B, h, w) -> (B, h, w, d/2)
        v = v[..., None] / freq
        return torch.cat([v.sin(), v.cos()], dim=-1)
    return torch.cat([enc(y), enc(x)], dim=-1).flatten(1, 2)                       # (B, h*w, d)


def coordinate_embeddings(num_bins, d):
    """Initial embeddings of the num_bins + 1 coordinate tokens: a sine code of the bin's position
    (frequencies 0.5 .. num_bins / 4 cycles per image), scaled to the norm of an N(0, 1) row. Nearby
    bins start similar, so a box prompt says where it is, and a near miss of the token head scores
    better than a far one, from the first step. -> (num_bins + 1, d)"""
    x = (torch.arange(num_bins + 1) + 0.5) / num_bins                             # bin centres in [0, 1]
    freq = 0.5 * (num_bins / 2) ** torch.linspace(0, 1, d // 2)                   # (d/2,) cycles per image
    angle = 2 * math.pi * x[:, None] * freq                                       # (bins + 1, d/2)
    return torch.cat([angle.sin(), angle.cos()], 1) * math.sqrt(2)                # rows of norm sqrt(d)


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention. Positions are added by the caller
    to the query/key inputs, never to the values. `cache` (a dict) holds keys/values of earlier
    steps for the autoregressive baseline."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def split(self, x):                                          # (B, L, d) -> (B, heads, L, d/heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, q, k, v, mask=None, causal=False, cache=None):
        q, k, v = self.split(self.q(q)), self.split(self.k(k)), self.split(self.v(v))
        if cache is not None:                                    # append this step's keys/values
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(x.transpose(1, 2).flatten(2))            # (B, Lq, d)


def dropout_layer(p):
    return nn.Dropout(p) if p > 0 else nn.Identity()     # p = 0: not even a copy


class FFN(nn.Sequential):
    def __init__(self, d, hidden, dropout):
        super().__init__(nn.Linear(d, hidden), nn.ReLU(inplace=True), dropout_layer(dropout), nn.Linear(hidden, d))


class EncoderLayer(nn.Module):
    """Post-norm: x = norm(x + attn(x + pos, x + pos, x)); x = norm(x + ffn(x))."""

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.attn, self.ffn = Attention(d, heads, dropout), FFN(d, ffn, dropout)
        self.norm1, self.norm2, self.drop = nn.LayerNorm(d), nn.LayerNorm(d), dropout_layer(dropout)

    def forward(self, x, pos, mask):
        q = x + pos
        x = self.norm1(x + self.drop(self.attn(q, q, x, mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention -> norm -> cross-attention -> norm -> FFN -> norm (3.3).

    Self-attention runs per sequence: the n sequences of each image are folded into the batch,
    x is (B*n, L, d). Cross-attention unfolds them into one query list per image, (B, n*L, d),
    against that image's memory (B, hw, d): no sequence gets its own copy of the memory.
    Sequence positions `pos` (L, d) go to the self-attention queries/keys and cross-attention queries.
    """

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(d, heads, dropout), Attention(d, heads, dropout)
        self.ffn = FFN(d, ffn, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = dropout_layer(dropout)

    def forward(self, x, pos, memory, mem_key, mem_mask, causal=False, cache=None):
        Bn, L, d = x.shape
        B = memory.shape[0]
        q = x + pos
        x = self.norm1(x + self.drop(self.self_attn(q, q, x, causal=causal, cache=cache)))
        q = (x + pos).reshape(B, -1, d)                                      # (B, n*L, d)
        y = self.cross_attn(q, mem_key, memory, mem_mask).reshape(Bn, L, d)  # back to (B*n, L, d)
        x = self.norm2(x + self.drop(y))
        return self.norm3(x + self.drop(self.ffn(x)))


class MAD(nn.Module):
    """Backbone + encoder + bi-directional decoder + token head over one shared vocabulary."""

    def __init__(self, cfg: Config, vocab: Vocab, backbone=None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        d = cfg.d_model
        self.backbone, channels = backbone or BACKBONES[cfg.backbone]()
        self.proj = nn.Conv2d(channels, d, 1)
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.heads, cfg.ffn, cfg.dropout) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d, cfg.heads, cfg.ffn, cfg.dropout) for _ in range(cfg.dec_layers))
        if cfg.xavier:
            for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.dec_norm = nn.LayerNorm(d)                     # shared by the outputs of every decoder layer
        self.embed = nn.Embedding(vocab.size, d)            # input tokens AND the head's class weights
        if cfg.sine_coords:
            with torch.no_grad():
                self.embed.weight[vocab.coord:vocab.vis] = coordinate_embeddings(vocab.num_bins, d)
        longest = 6 + max(5 * cfg.num_queries, cfg.mask_size ** 2, 3 * 17, cfg.caption_len) + 1
        # learned positions, shared by all tasks, on the scale of the token embeddings (N(0, 1), as
        # DETR's query embeddings): in a fully masked sequence they are all that tells slots apart
        self.seq_pos = nn.Parameter(torch.randn(longest, d))
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- image side --------------------------------------------------------
    def encode(self, images, pad_mask):
        """images (B, 3, H, W), pad_mask (B, H, W) True at padding -> memory (B, hw, d),
        memory keys (memory + positions) and the memory padding mask for attention (B, 1, 1, hw)."""
        f = self.proj(self.backbone(images))                                   # (B, d, h, w)
        mask = F.interpolate(pad_mask[:, None].float(), size=f.shape[-2:])[:, 0].bool()   # (B, h, w)
        pos = sine_positions(mask, f.shape[1])                                 # (B, hw, d)
        x = f.flatten(2).transpose(1, 2)                                       # (B, hw, d)
        attend = ~mask.flatten(1)[:, None, None, :]                            # (B, 1, 1, hw) True = attend
        return self.run_encoder(x, pos, attend)

    def run_encoder(self, x, pos, attend):
        """The transformer encoder over the image tokens x (B, hw, d)."""
        for layer in self.encoder:
            x = layer(x, pos, attend)
        return x, x + pos, attend

    # -- sequence side -----------------------------------------------------
    def decode(self, tokens, enc, all_layers=False, caches=None, offset=0):
        """tokens (B, n, L) -> hidden states after the shared final norm:
        (layers, B, n, L, d) if all_layers (for the auxiliary losses) else (B, n, L, d).
        MAD attends bi-directionally; the autoregressive baseline (cfg.decoder == "ar") causally,
        optionally with one key/value cache per layer (`caches`), the tokens starting at `offset`."""
        B, n, L = tokens.shape
        x = self.embed(tokens).flatten(0, 1)                                   # (B*n, L, d)
        pos = self.seq_pos[offset:offset + L]                                  # (L, d)
        causal = self.cfg.decoder == "ar" and L > 1                            # a cached single step sees all
        outs = []
        for layer, cache in zip(self.decoder, caches or [None] * len(self.decoder)):
            x = layer(x, pos, *enc, causal=causal, cache=cache)
            if all_layers:
                outs.append(x)
        if not all_layers:
            return self.dec_norm(x).view(B, n, L, -1)
        return self.dec_norm(torch.stack(outs)).view(len(outs), B, n, L, -1)

    def logits(self, h, task):
        """Token head: cosine similarity between the MLP output and the embeddings of the task's
        allowed tokens only, times a learned temperature. h (..., d) -> (..., hi - lo)."""
        lo, hi = self.vocab.task_range(task)
        z = F.normalize(self.head(h), dim=-1)
        w = F.normalize(self.embed.weight[lo:hi], dim=-1)
        return z @ w.t() * self.logit_scale.exp()

    def compile_parts(self, **options):
        """torch.compile the transformer encoder and the decoder stack: `run_encoder` and `decode` are
        replaced on this instance, so parameter names and checkpoints do not change. dynamic=True:
        multi-scale images and the per-task sequence lengths and counts share one graph. The
        backbone stays eager (inductor's convolutions guard on the feature map's width and would
        recompile for every image size), as do the head, the losses and the matcher."""
        self.run_encoder = torch.compile(self.run_encoder, dynamic=True, **options)
        self.decode = torch.compile(self.decode, dynamic=True, **options)
        return self

    def param_groups(self, lr, backbone_lr, weight_decay):
        """AdamW groups: the backbone is fine-tuned with the lower learning rate (supplementary A);
        normalization weights and biases get no weight decay (as in the authors' code)."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        norms = {id(p) for m in self.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for p in m.parameters()}
        groups = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in in_backbone, id(p) in norms), []).append(p)
        return [dict(params=ps, lr=backbone_lr if backbone else lr, weight_decay=0.0 if norm else weight_decay)
                for (backbone, norm), ps in sorted(groups.items())]

    # -------------------------------------------------------------------------
    # 3.2 Masked training: decode a fully masked and a partly masked copy of every task's
    # sequences in one forward; the loss counts masked positions only (eq. 1).

    def forward(self, batch, tasks=TASKS, counts=None):
        """batch: data.collate output (keys in data.py). Returns (total loss, {task: detached loss}).
        Per task and decoder layer: summed weighted CE / number of counted positions (eq. 1). The
        counts are averaged over DDP ranks, so that DDP's gradient averaging gives the gradient of
        (CE summed over all ranks / total count); `counts` ({task: (layers,)}) replaces them, for
        exact gradient accumulation (train.py counts all micro-batches first)."""
        sums, own = self.task_sums(batch, tasks)
        if counts is None:
            counts = {t: all_reduce_mean(c) for t, c in own.items()}
        losses = {t: (sums[t] / counts[t].clamp(min=1)).sum() for t in tasks}     # sum over layers
        weights = dict(zip(TASKS, self.cfg.task_weights))
        total = sum(weights[t] * losses[t] for t in tasks)
        return total, {t: l.detach() for t, l in losses.items()}

    def task_sums(self, batch, tasks):
        """({task: summed weighted CE per layer}, {task: counted positions per layer})."""
        enc = self.encode(batch["images"], batch["pad_mask"])   # the image is encoded once per step (3.4)
        # detection last: its matcher waits for the GPU (costs to the CPU for scipy), best with the
        # other tasks' work already queued
        out = {t: self.ar_loss(batch, enc, t) if self.cfg.decoder == "ar" else getattr(self, f"{t}_loss")(batch, enc)
               for t in sorted(tasks, key=lambda t: t == "det")}
        return {t: o[0] for t, o in out.items()}, {t: o[1] for t, o in out.items()}

    @torch.no_grad()
    def count_positions(self, batch, tasks=TASKS):
        """The counted positions per task and layer that forward(batch) would normalize by."""
        return self.task_sums(batch, tasks)[1]

    def partial_masks(self, shape, device):
        """Masks of the partly masked copies of sequences (B, n, L) (3.2, Table 3): (B, n, L) hiding
        mask_ratio of each sequence ("fixed") or a ratio drawn per sequence from [0.6, 0.8] ("random"),
        or (B, 2n, L): one copy at 0.6, one at 0.8 ("multiple")."""
        if self.cfg.mask_strategy == "multiple":
            return torch.cat([random_mask(shape, 0.6, device), random_mask(shape, 0.8, device)], 1)
        if self.cfg.mask_strategy == "random":
            return random_mask(shape, torch.empty(shape[:-1], device=device).uniform_(0.6, 0.8), device)
        return random_mask(shape, self.cfg.mask_ratio, device)

    def masked_copies(self, seqs):
        """seqs (B, n, L) -> inputs (B, c*n, L): n fully masked copies, then the partly masked ones
        (c = 2, or 3 with two masking ratios), and `masked` (B, c*n, L)."""
        partial = self.partial_masks(seqs.shape, seqs.device)
        masked = torch.cat([torch.ones_like(seqs, dtype=torch.bool), partial], 1)
        inputs = torch.where(masked, self.vocab.mask, seqs.repeat(1, masked.shape[1] // seqs.shape[1], 1))
        return inputs, masked

    def decode_task(self, prompt, inputs, enc, task):
        """prompt (B, n, 6), inputs (B, n, L) -> log-probs over the task's tokens (layers, B, n, L, V)."""
        h = self.decode(torch.cat([prompt, inputs], -1), enc, all_layers=True)[..., 6:, :]
        return self.logits(h, task).log_softmax(-1)

    def det_loss(self, batch, enc):
        seqs = batch["det_seq"].flatten(1)[:, None]                            # (B, 1, 5Q): one sequence
        inputs, masked = self.masked_copies(seqs)                              # (B, c, 5Q)
        prompt = self.vocab.det_prompt.to(seqs.device).expand(*inputs.shape[:2], 6)
        logp = self.decode_task(prompt, inputs, enc, "det")                    # (layers, B, c, 5Q, V)
        target, weight = match_detections(logp, inputs, masked, batch["det_gt"], self.vocab)
        return masked_nll(logp, target, weight * masked)

    def seg_loss(self, batch, enc):
        return self.prompted_loss(batch["seg_prompt"], batch["seg_seq"], batch["seg_weight"], enc, "seg")

    def kpt_loss(self, batch, enc):
        return self.prompted_loss(batch["kpt_prompt"], batch["kpt_seq"], batch["kpt_weight"], enc, "kpt")

    def prompted_loss(self, prompt, seqs, weight, enc, task):
        """Segmentation and keypoints: the prompt (task token, box, class) fixes the target,
        so no matching. prompt (B, S, 6), seqs and weight (B, S, L)."""
        inputs, masked = self.masked_copies(seqs)                              # (B, cS, L)
        c = inputs.shape[1] // seqs.shape[1]
        logp = self.decode_task(prompt.repeat(1, c, 1), inputs, enc, task)     # (layers, B, cS, L, V)
        target = seqs.repeat(1, c, 1) - self.vocab.task_range(task)[0]
        return masked_nll(logp, target, weight.repeat(1, c, 1) * masked)

    def cap_loss(self, batch, enc):
        """Captioning: the fully masked copy is ONE sequence per image, trained towards the reference
        it predicts best (per layer); the partly masked copy holds every reference (two copies with
        two masking ratios), with one random visible token of each replaced by a random text token
        (3.1 sequence augmentation; cap_full_word: the fully masked copy shows one too, untrained)."""
        refs, weight = batch["cap_seq"], batch["cap_weight"]                   # (B, R, L)
        B, R, L = refs.shape
        lo, hi = self.vocab.task_range("cap")
        partial = self.partial_masks(refs.shape, refs.device)                  # (B, pR, L), p copies
        p = partial.shape[1] // R
        noisy = torch.where(partial, self.vocab.mask, refs.repeat(1, p, 1))
        pick = (torch.rand(partial.shape, device=refs.device) * ~partial).argmax(-1, keepdim=True)   # a visible slot
        word = torch.randint(lo, hi, (B, p * R, 1), device=refs.device)
        noisy = noisy.scatter(-1, pick, torch.where(partial.gather(-1, pick), self.vocab.mask, word))
        blank = torch.full_like(refs[:, :1], self.vocab.mask)                  # (B, 1, L) the full copy
        if self.cfg.cap_full_word:                                             # one slot shows a random word
            blank = blank.scatter(-1, torch.randint(0, L, (B, 1, 1), device=refs.device),
                                torch.randint(lo, hi, (B, 1, 1), device=refs.device))
        inputs = torch.cat([blank, noisy], 1)                                  # (B, 1+pR, L)
        prompt = self.vocab.cap_prompt.to(refs.device).expand(B, 1 + p * R, 6)
        logp = self.decode_task(prompt, inputs, enc, "cap")                   # (layers, B, 1+pR, L, V)
        target = refs - lo
        # best reference of the fully masked copy: lowest mean cross-entropy over its targets, per layer
        shown = blank != self.vocab.mask                                       # (B, 1, L) a shown word: no target
        full = logp[:, :, :1].expand(-1, -1, R, -1, -1)                        # (layers, B, R, L, V)
        nll = -full.gather(-1, target[None, ..., None].expand(len(logp), -1, -1, -1, 1))[..., 0]
        counted = weight * ~shown                                              # (B, R, L) the full copy's targets
        mean = (nll * counted).sum(-1) / counted.sum(-1).clamp(min=1)         # (layers, B, R)
        best = mean.masked_fill(counted.sum(-1) == 0, float("inf")).argmin(-1) # (layers, B)
        idx = best[..., None, None].expand(-1, -1, 1, L)                       # (layers, B, 1, L)
        n_layers = len(logp)
        full_t = target.expand(n_layers, -1, -1, -1).gather(2, idx)
        full_w = counted.expand(n_layers, -1, -1, -1).gather(2, idx)
        target = torch.cat([full_t, target.repeat(1, p, 1).expand(n_layers, -1, -1, -1)], 2)   # (layers, B, 1+pR, L)
        weight = torch.cat([full_w, (weight.repeat(1, p, 1) * partial).expand(n_layers, -1, -1, -1)], 2)
        return masked_nll(logp, target, weight)


    # -------------------------------------------------------------------------
    # 3.2 / 4.1 Masked inference: detection -> segmentation and keypoints prompted by the
    # detections -> captioning. One stage (ratio 1.0) is pure parallel decoding.

    @torch.no_grad()
    def predict(self, images, pad_mask, sizes, orig_sizes, tasks=TASKS, tokenizer=None, boxes=None):
        """images (B, 3, H, W), pad_mask (B, H, W), sizes / orig_sizes (B, 2) as (h, w) of the
        resized (unpadded) and the original image; `boxes`: for a model without the detection task,
        B tensors (n, 5) [x0, y0, x1, y1 original pixels, class] that prompt segmentation and
        keypoints instead of detections (an oracle: ground-truth boxes, score 1).
        Returns one dict per image, on the images' device:
          boxes (Q, 4) xyxy original pixels, scores (Q,), labels (Q,)   sorted by score
          masks (K, H0, W0) bool for the first K = min(seg_topk, Q) detections
          keypoints (P, 17, 3) x, y, p(visible) for person detections; kpt_index (P,) into boxes
          caption str (caption_ids (L,) without a tokenizer)
        Everything, mask pasting included, runs on the images' device, with one synchronization at
        the end (the keypoint selection and the caption text). Moving 100 pasted masks of an
        800 x 1333 image to the CPU (for COCO's RLE) is the caller's: evaluate.py does it per batch."""
        hw = orig_sizes.tolist()                                              # before any device work is queued
        enc = self.encode(images, pad_mask)
        res = {}                                                              # on the device until the end
        if {"det", "seg", "kpt"} & set(tasks):
            det = self.predict_detections(enc) if boxes is None else self.given_detections(boxes, orig_sizes, images.device)
            res.update(boxes=self.to_pixels(det["box_tokens"], orig_sizes), scores=det["scores"], labels=det["labels"])
        if "seg" in tasks:
            K, M = min(self.cfg.seg_topk, det["scores"].shape[1]), self.cfg.mask_size
            prompt = self.box_prompts(det, self.vocab.seg, torch.arange(K, device=images.device).expand(len(images), K))
            prob = self.decode_sequences(prompt, M * M, enc, "seg", (1.0,))[..., 0]   # (B, K, M*M) p(<fg>)
            res["masks"] = [paste_masks(p, b, h, w) for p, b, (h, w) in
                            zip(prob.view(-1, K, M, M).float(), res["boxes"][:, :K], hw)]
        if "kpt" in tasks and self.vocab.person >= 0:
            K = min(self.cfg.seg_topk, det["scores"].shape[1])
            is_person = det["labels"] == self.vocab.person                    # (B, Q), sorted by score
            index = (~is_person).float().argsort(dim=-1, stable=True)[:, :K]  # persons first, by score
            prompt = self.box_prompts(det, self.vocab.kpt, index)
            prob = self.decode_sequences(prompt, 51, enc, "kpt", self.cfg.kpt_ratios, by_confidence=True)
            xy, vis = self.keypoints_from_probs(prob)                         # (B, K, 17, 2) tokens, (B, K, 17)
            res.update(keypoints=torch.cat([self.to_pixels(xy.flatten(2), orig_sizes).unflatten(2, (17, 2)),
                                            vis[..., None]], -1),             # (B, K, 17, 3)
                       kpt_index=index, kpt_keep=is_person.gather(1, index))
        if "cap" in tasks:
            prompt = self.vocab.cap_prompt.to(images.device).expand(len(images), 1, 6)
            prob = self.decode_sequences(prompt, self.cfg.caption_len, enc, "cap", self.cfg.cap_ratios)
            res["caption_ids"] = prob[:, 0].argmax(-1)                        # (B, L) SentencePiece ids
        out = [{k: v[b] for k, v in res.items()} for b in range(len(images))]
        for b, o in enumerate(out):
            if boxes is not None:                                             # the given boxes only, no padding
                n = len(boxes[b])
                o.update({k: o[k][:n] for k in ("boxes", "scores", "labels", "masks") if k in o})
                if "keypoints" in o:
                    o["kpt_keep"] = o["kpt_keep"] & (o["kpt_index"] < n)
            if "keypoints" in o:
                keep = o.pop("kpt_keep")
                o["keypoints"], o["kpt_index"] = o["keypoints"][keep], o["kpt_index"][keep]
            if "caption_ids" in o and tokenizer:
                o["caption"] = tokenizer.decode(o.pop("caption_ids").tolist())
        return out

    def to_pixels(self, coords, orig_sizes):
        """Post-processing of coordinates: tokens (B, n, 2k) alternating x, y -> bin centres in
        pixels of the original images (B, n, 2k). Boxes keep their corner order."""
        wh = orig_sizes.flip(-1).to(coords.device, torch.float32)[:, None, None]   # (B, 1, 1, 2) as (w, h)
        return (self.vocab.dequantize(coords).unflatten(-1, (-1, 2)) * wh).flatten(-2)

    def given_detections(self, boxes, orig_sizes, device):
        """Boxes that stand in for detections (B tensors (n, 5), see predict) -> predict_detections'
        dict, padded to the most boxes of the batch with rows of score 0."""
        n = max([len(b) for b in boxes] + [1])
        given = torch.zeros(len(boxes), n, 5)
        for i, b in enumerate(boxes):
            given[i, :len(b)] = b
        wh = orig_sizes.flip(-1).float().repeat(1, 2)[:, None]                # (B, 1, 4) as w, h, w, h
        scores = (torch.arange(n) < torch.tensor([len(b) for b in boxes])[:, None]).float()
        return dict(box_tokens=self.vocab.quantize(given[..., :4] / wh).to(device), scores=scores.to(device),
                    labels=given[..., 4].long().to(device))

    def predict_detections(self, enc):
        """One fully masked pass over the detection sequence. Returns, sorted by score (B, Q, ...):
        box tokens (x0 <= x1, y0 <= y1), scores, labels."""
        B, Q, C, v = len(enc[0]), self.cfg.num_queries, self.vocab.num_classes, self.vocab
        prompt = v.det_prompt.to(enc[0].device).expand(B, 1, 6)
        prob = self.decode_sequences(prompt, 5 * Q, enc, "det", (1.0,), restrict=self.cfg.det_score == "classes")
        prob = prob.view(B, Q, 5, -1)                                          # (B, Q, 5, V)
        coords = prob[:, :, :4, C + 1:].argmax(-1) + v.coord                  # (B, Q, 4) coordinate tokens
        coords = torch.cat([torch.minimum(coords[..., :2], coords[..., 2:]),
                            torch.maximum(coords[..., :2], coords[..., 2:])], -1)
        scores, labels = prob[:, :, 4, :C].max(-1)                            # low if <noise> is likely
        order = scores.argsort(-1, descending=True)
        return dict(box_tokens=coords.gather(1, order[..., None].expand_as(coords)),
                    scores=scores.gather(1, order), labels=labels.gather(1, order))

    def box_prompts(self, det, task_token, index):
        """Prompts [task, x0, y0, x1, y1, class] (B, K, 6) from the detections at index (B, K)."""
        boxes = det["box_tokens"].gather(1, index[..., None].expand(-1, -1, 4))
        cls = det["labels"].gather(1, index)[..., None] + self.vocab.cls
        return torch.cat([torch.full_like(cls, task_token), boxes, cls], -1)

    def decode_sequences(self, prompt, L, enc, task, ratios, by_confidence=False, restrict=True):
        """prompt (B, n, 6) -> probabilities (B, n, L, V): masked inference, or greedy decoding
        for the autoregressive baseline."""
        if self.cfg.decoder == "ar":
            return self.generate(prompt, L, enc, task)
        return self.refine(prompt, L, enc, task, ratios, by_confidence, restrict)

    def refine(self, prompt, L, enc, task, ratios, by_confidence=False, restrict=True):
        """Masked inference (3.2). Stage 1 decodes from all-<mask>; each later stage re-masks a share
        `ratio` of the positions (random, or the least confident) of the current argmax tokens and
        decodes again; at re-masked positions the new logits join a running mean (or, with remask_average
        "halve", the authors' (ensemble + new) / 2: later stages weigh more). The random
        positions come from a fixed seed and are the same for every image, so a prediction does
        not depend on the batch or the number of processes it was made in.
        prompt (B, n, 6) -> probabilities (B, n, L, V) over the task's tokens (restrict: over the
        tokens allowed at each position)."""
        B, n, _ = prompt.shape
        lo = self.vocab.task_range(task)[0]
        tokens = torch.full((B, n, L), self.vocab.mask, device=prompt.device)
        conf = torch.zeros(B, n, L, device=prompt.device)
        logits, count = 0, torch.zeros(B, n, L, 1, device=prompt.device)
        g = torch.Generator().manual_seed(0)
        for ratio in ratios:
            order = conf if by_confidence else torch.rand(L, generator=g).to(conf.device).expand_as(conf)
            remask = order.argsort(-1).argsort(-1) < round(ratio * L)          # (B, n, L)
            x = torch.where(remask, self.vocab.mask, tokens)
            new = self.logits(self.decode(torch.cat([prompt, x], -1), enc)[..., 6:, :], task)
            m = remask[..., None].float()
            w = 1 / (count + 1) if self.cfg.remask_average == "running" else 0.5 + 0.5 * (count == 0)
            logits = logits + (new - logits) * w * m          # running: (logits * count + new) / (count + 1)
            count = count + m
            conf, tokens = self.allowed(logits, task).softmax(-1).max(-1)
            tokens = tokens + lo
        return (self.allowed(logits, task) if restrict else logits).softmax(-1)

    def allowed(self, logits, task, offset=0):
        """Only the tokens that can stand at each position (others -> -inf), so that argmax tokens
        fed back into the decoder are well formed: detection x0..y1 coordinates and class
        (a real class or <noise>) at the 5th; keypoint x, y coordinates and <vis>/<invis> at the 3rd.
        logits (..., L, V) for positions offset..offset+L-1."""
        if task not in ("det", "kpt"):
            return logits
        period, first_special = (5, self.vocab.num_classes + 1) if task == "det" else (3, self.vocab.num_bins + 1)
        pos = torch.arange(offset, offset + logits.shape[-2], device=logits.device)
        tok = torch.arange(logits.shape[-1], device=logits.device)
        if task == "det":                # det range: classes, <noise>, coordinates
            ok = (pos[:, None] % 5 == 4) == (tok[None] < first_special)
        else:                            # kpt range: coordinates, <vis>, <invis>
            ok = (pos[:, None] % 3 == 2) == (tok[None] >= first_special)
        return logits.masked_fill(~ok, float("-inf"))

    def keypoints_from_probs(self, prob):
        """(B, K, 51, V) keypoint probabilities -> x, y coordinate tokens (B, K, 17, 2) and p(<vis>) (B, K, 17)."""
        nb = self.vocab.num_bins
        prob = prob.unflatten(2, (17, 3))
        xy = prob[..., :2, : nb + 1].argmax(-1) + self.vocab.coord
        vis = prob[..., 2, nb + 1] / prob[..., 2, nb + 1:].sum(-1).clamp(min=1e-12)
        return xy, vis

    # -------------------------------------------------------------------------
    # Supplementary B: the autoregressive baseline. Same network and sequences; causal
    # self-attention, <start> first, next-token teacher forcing, detection GT objects first
    # (pix2seq order). <end> is not trained: decoding always runs to each task's full length
    # (as in the paper), so it would never be read.

    def ar_loss(self, batch, enc, task):
        prompt, seqs, weight = self.ar_sequences(batch, task)                  # (B, n, 6), (B, n, L) x2
        start = torch.full_like(seqs[..., :1], self.vocab.start)
        h = self.decode(torch.cat([prompt, start, seqs[..., :-1]], -1), enc, all_layers=True)
        logp = self.logits(h[..., 6:, :], task).log_softmax(-1)                # (layers, B, n, L, V)
        return masked_nll(logp, seqs - self.vocab.task_range(task)[0], weight)

    def ar_sequences(self, batch, task):
        """Teacher-forcing sequences of the baseline: (prompt (B, n, 6), tokens (B, n, L), weight)."""
        v = self.vocab
        if task in ("seg", "kpt"):
            return batch[f"{task}_prompt"], batch[f"{task}_seq"], batch[f"{task}_weight"]
        if task == "cap":
            refs = batch["cap_seq"]
            return v.cap_prompt.to(refs.device).expand(*refs.shape[:2], 6), refs, batch["cap_weight"]
        slots, gt = batch["det_seq"], batch["det_gt"]                          # (B, Q, 5), B x (n_b, 5)
        B, Q, _ = slots.shape
        gt_pad = torch.full((B, max([len(g) for g in gt] + [1]), 5), -1, dtype=torch.long, device=slots.device)
        for b, g in enumerate(gt):
            gt_pad[b, : len(g)] = g
        is_gt = (slots[:, :, None] == gt_pad[:, None]).all(-1).any(-1)         # (B, Q)
        order = (~is_gt).float().argsort(dim=-1, stable=True)                  # GT slots first
        seqs = slots.gather(1, order[..., None].expand(-1, -1, 5))
        noise = torch.arange(Q, device=slots.device)[None] >= is_gt.sum(1, keepdim=True)   # (B, Q)
        target = seqs.clone()
        target[..., 4] = torch.where(noise, v.noise, seqs[..., 4])             # noise objects -> <noise>
        weight = torch.ones(B, Q, 5, device=slots.device)
        weight[..., :4] *= ~noise[..., None]                                   # their boxes are not learned
        prompt = v.det_prompt.to(slots.device).expand(B, 1, 6)
        return prompt, target.flatten(1)[:, None], weight.flatten(1)[:, None]

    def generate(self, prompt, L, enc, task, use_cache=True):
        """Greedy autoregressive decoding to the full length L, one token per decoder pass, with a
        key/value cache in every self-attention layer (without: re-decode the whole prefix).
        prompt (B, n, 6) -> probabilities (B, n, L, V) of the steps."""
        lo = self.vocab.task_range(task)[0]
        x = torch.cat([prompt, torch.full_like(prompt[..., :1], self.vocab.start)], -1)   # (B, n, 7)
        caches = [dict() for _ in self.decoder] if use_cache else None
        probs = []
        for t in range(L):
            if use_cache:
                h = self.decode(x if t == 0 else x[..., -1:], enc, caches=caches, offset=0 if t == 0 else 6 + t)
            else:
                h = self.decode(x, enc)
            p = self.allowed(self.logits(h[..., -1:, :], task), task, offset=t).softmax(-1)   # (B, n, 1, V)
            probs.append(p)
            x = torch.cat([x, p.argmax(-1) + lo], -1)
        return torch.cat(probs, 2)


def cuda_settings():
    """What this model wants from CUDA: TF32 matmuls and convolutions (as the paper's A100s), and no
    cuDNN attention: it builds a plan for every new shape, and multi-scale training brings new shapes
    at almost every step (r50 --amp on an H200: 1.5 images/s with it, 4.6 without); flash and
    memory-efficient attention take no per-shape plan."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)


def random_mask(shape, ratio, device):
    """Bool mask (..., L) hiding exactly round(ratio * L) uniformly chosen positions per sequence;
    ratio a number, or a tensor of one ratio per sequence (shape[:-1])."""
    rank = torch.rand(shape, device=device).argsort(-1).argsort(-1)
    if torch.is_tensor(ratio):
        return rank < (ratio * shape[-1]).round()[..., None]
    return rank < round(ratio * shape[-1])


def all_reduce_mean(x):
    """Average a tensor over DDP ranks (identity when not distributed): the loss normalizers."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x = x / torch.distributed.get_world_size()
    return x


def masked_nll(logp, target, weight):
    """Weighted cross-entropy summed per layer, and the weights' sum (the counted positions).
    logp (layers, ..., V); target and weight broadcast to (layers, ...). -> (layers,), (layers,)."""
    target, weight = torch.broadcast_tensors(target, weight.to(logp.dtype))
    target, weight = target.expand(logp.shape[:-1]), weight.expand(logp.shape[:-1])
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return (nll * weight).flatten(1).sum(1), weight.detach().flatten(1).sum(1)


@torch.no_grad()
def match_detections(logp, inputs, masked, gt, vocab, forced_cost=1e4):
    """Hungarian matching of detection slots to ground-truth objects (3.2), as DETR's matcher:
    one batched cost matrix, moved to the CPU once, scipy per (layer, image, copy).

    logp    (layers, B, c, 5Q, V) log-probs over the detection tokens (classes, <noise>, coords)
    inputs  (B, c, 5Q) decoder input tokens; masked (B, c, 5Q) True where <mask>
    gt      list of B tensors (n_b, 5) of ground-truth tokens [x0, y0, x1, y1, class]
    cost(slot, obj) = mean over the 5 tokens of -log p(obj's token); at a visible position the
    prediction is the visible token itself (cost 0 if it equals obj's token, else forced_cost),
    so a slot that shows an object's tokens is matched to that object.
    Returns target (layers, B, c, 5Q) token indices within the detection range and weight: matched
    slots learn their object's 5 tokens, the others learn class <noise> (coordinates weight 0).
    """
    n_layers, B, c, T, V = logp.shape
    Q = T // 5
    lo = vocab.task_range("det")[0]
    sizes = [len(g) for g in gt]
    G = max(sizes + [1])
    gt_pad = torch.zeros(B, G, 5, dtype=torch.long, device=logp.device)
    for b, g in enumerate(gt):
        gt_pad[b, : len(g)] = g.to(logp.device) - lo                           # (B, G, 5) local ids
    idx = gt_pad.transpose(1, 2)[None, :, None, None].expand(n_layers, B, c, Q, 5, G)
    nll = -logp.view(n_layers, B, c, Q, 5, V).gather(-1, idx)                  # (layers, B, c, Q, 5, G)
    shown = (inputs.view(B, c, Q, 5, 1) - lo) == gt_pad.transpose(1, 2)[:, None, None]   # (B, c, Q, 5, G)
    visible = ~masked.view(B, c, Q, 5, 1)
    nll = torch.where(visible, (~shown).to(nll.dtype) * forced_cost, nll)
    cost = nll.mean(4).float().cpu()                                           # (layers, B, c, Q, G)
    # scipy rejects NaN and +inf costs; a non-finite log-prob reaches the loss anyway, whose check
    # (all-reduced in train.py) then stops every rank cleanly, so here it only needs a finite stand-in
    cost = cost.nan_to_num(nan=1e9, posinf=1e9, neginf=-1e9)

    target = torch.zeros(n_layers, B, c, Q, 5, dtype=torch.long)
    target[..., 4] = vocab.noise - lo
    weight = torch.zeros(n_layers, B, c, Q, 5)
    weight[..., 4] = 1
    rows = [(l, b, k, *linear_sum_assignment(cost[l, b, k, :, : sizes[b]]))
            for l in range(n_layers) for b in range(B) for k in range(c) if sizes[b]]
    if rows:
        l, b, k, q, g = (torch.as_tensor(np.concatenate([np.broadcast_to(r[i], r[3].shape) for r in rows]))
                         for i in range(5))
        target[l, b, k, q] = gt_pad.cpu()[b, g]
        weight[l, b, k, q] = 1
    return target.flatten(3).to(logp.device), weight.flatten(3).to(logp.device)


def paste_masks(prob, boxes, H, W, chunk=16):
    """Resample M x M foreground probabilities bilinearly into their boxes on the H x W image
    and threshold at 0.5 (no RoIAlign at test time, as the paper), on prob's device.
    prob (K, M, M), boxes (K, 4) xyxy pixels -> (K, H, W) bool. The resampling is separable:
    mask = Wy @ prob @ Wx^T, with Wy (K, H, M) and Wx (K, W, M) the bilinear weights of each
    pixel centre (zero outside the box)."""
    def weights(lo, hi, size, m):                      # (K,) edges -> (K, size, m)
        centre = torch.arange(size, dtype=torch.float32, device=lo.device) + 0.5
        u = (centre - lo[:, None]) / (hi - lo).clamp(min=1e-3)[:, None] * m - 0.5
        inside = (centre >= lo[:, None]) & (centre < hi[:, None])
        w = (1 - (u.clamp(0, m - 1)[..., None] - torch.arange(m, device=lo.device)).abs()).clamp(min=0)
        return w * inside[..., None]
    M = prob.shape[-1]
    out = torch.empty(len(prob), H, W, dtype=torch.bool, device=prob.device)
    for i in range(0, len(prob), chunk):               # chunks bound the float memory to chunk*H*W
        b = boxes[i:i + chunk].float()
        wy, wx = weights(b[:, 1], b[:, 3], H, M), weights(b[:, 0], b[:, 2], W, M)
        out[i:i + chunk] = wy @ prob[i:i + chunk] @ wx.transpose(1, 2) >= 0.5
    return out

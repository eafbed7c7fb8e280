"""Masked AutoDecoder (MAD): one network for detection, segmentation, keypoints and captions.

Paper: "Masked AutoDecoder is Effective Multi-Task Vision Generalist" (Qiu et al., CVPR 2024).
This file is the method, section by section (the network before the training that uses it):
  3.1  the shared vocabulary and the caption tokenizer   (data.py builds the task sequences)
  3.3  the network: backbone -> transformer encoder -> bi-directional decoder -> token head
  3.2  masked training: fully and partly masked copies, Hungarian matching, the losses
       (3.4's eq. 1 weighs them)
  3.2  masked inference: detection -> segmentation and keypoints -> captions, post-processing
  B    the autoregressive baseline of Table 2 (same network, causal decoder)
Nothing else: processes, devices and checkpoints are runtime.py's; train.py and evaluate.py use
both.
"""
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment


# -----------------------------------------------------------------------------
# Configuration: the paper's defaults (4.1, Table 9); the README says where they differ
# from the authors' code

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
    grid_size: int = 16              # a segmentation target: a grid_size^2 grid (Table 6)
    max_instances: int = 10          # segmentation / keypoint instances per image in training
    caption_len: int = 20            # caption tokens, eos and padding included
    max_captions: int = 5            # reference captions per image
    sample_captions: bool = False    # training: the first max_captions (authors') | a random draw
    mask_ratio: float = 0.7          # share of tokens masked in the partly masked copy (Table 4)
    mask_strategy: str = "fixed"     # Table 3: fixed | random (a ratio per sequence in 0.6..0.8)
                                     #   | multiple (two copies, at 0.6 and 0.8)
    cap_full_word: bool = True       # the fully masked caption shows one random word (authors')
    tasks: tuple = ("det", "seg", "kpt", "cap")   # trained and evaluated (Table 8: one alone)
    task_weights: tuple = (1.5, 2.7, 0.5, 0.3)    # det, seg, kpt, cap (supplementary C)
    decoder: str = "mad"             # mad (bi-directional, parallel) | ar (autoregressive baseline)
    kpt_ratios: tuple = (1.0,)       # masked inference: each stage's mask ratio (4.1: 1.0, 0.7)
    cap_ratios: tuple = (1.0, 0.8, 0.6, 0.4)
    remask_average: str = "halve"    # re-masked logits: (ensemble + new) / 2 (the authors',
                                     #   Table 7's) | running: a running mean of the stages
    det_score: str = "all"           # p(class): softmax over every detection token
                                     #   | classes: over the classes and <noise> only
    seg_topk: int = 100              # detections that prompt segmentation / keypoints
    sine_coords: bool = False        # coordinate token embeddings start as sine codes of their bin
                                     #   (not in the paper or the authors' code: N(0, 1) rows)
    image_size: int = 800            # shorter side at test time (longer side <= max_size)
    max_size: int = 1333
    scale_jitter: str = "multiscale" # training resize: multiscale (short side 480..800, DETR crop)
                                     #   | lsj (large-scale jitter)


PRESETS = {
    "r50": dict(backbone="r50"),
    "swin_b": dict(backbone="swin_b"),
    "swin_b384": dict(backbone="swin_b384"),    # the paper's window 12; no torchvision weights
    "vit_b": dict(backbone="vit_b", image_size=1024, max_size=1024, scale_jitter="lsj"),
    # sized to train on 2 CPU cores in minutes (train.py --demo, the tests): no dropout (the CPU's
    # attention kernel has none), 8 x 8 masks, 10 slots for the synthetic images' 1-4 objects, and
    # 2 segmentation / keypoint instances and 3 captions (of up to 5, drawn) per image and step.
    # It keeps the sine coordinate embeddings and the running mean its demo and ablations were
    # measured with.
    "tiny": dict(backbone="tiny", d_model=128, enc_layers=2, dec_layers=3, heads=4, ffn=512,
                 dropout=0.0, num_queries=10, num_bins=128, grid_size=8, max_instances=2,
                 max_captions=3, image_size=128, max_size=128, sine_coords=True,
                 remask_average="running", sample_captions=True),
}

TASKS = ("det", "seg", "kpt", "cap")
PROMPT_LEN = 6                       # every task sequence starts with 6 prompt tokens (3.1)
BOX_LEN = 5                          # a detection slot: x0, y0, x1, y1, class
NUM_KEYPOINTS = 17                   # COCO's person keypoints
KPT_LEN = 3 * NUM_KEYPOINTS          # a keypoint sequence: x, y, <vis>|<invis> per keypoint
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the backbones' input statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


# -----------------------------------------------------------------------------
# 3.1 Task tokenization: one shared vocabulary

class Vocab:
    """Token ids of the one shared vocabulary.

    Specials: 6 detection prompts, <seg>, <kpt>, 6 caption prompts, <mask>, <start>, <end>.
    Then classes, <noise>, num_bins+1 coordinates, <vis>, <invis>, <fg>, <bg>, text pieces.
    The order is chosen so that every task's allowed tokens form one contiguous range
    (task_range): the token head scores a slice of the embedding table and a target's
    index within its task is simply `token - lo`.
    """

    def __init__(self, num_classes, num_bins, num_text, person=-1):
        self.num_classes, self.num_bins, self.num_text = num_classes, num_bins, num_text
        self.person = person                    # class index of "person" (keypoints), -1 if none
        self.det_prompt = torch.arange(0, PROMPT_LEN)   # the 6 detection prompt tokens
        self.seg, self.kpt = 6, 7                       # segmentation / keypoint task tokens
        self.cap_prompt = torch.arange(8, 8 + PROMPT_LEN)   # the 6 caption prompt tokens
        self.mask_token, self.start, self.end = 14, 15, 16
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
# 3.3 Architecture: backbone -> 1x1 projection + sine positions -> encoder -> decoder -> token head

def tiny_backbone():
    """A small CNN for tests and the CPU demo, stride 32. GroupNorm, not BatchNorm, so a sample's
    features do not depend on the rest of its batch (DDP with batch 1 per rank == one batch of
    2)."""
    layers, c_in = [], 3
    for c in (32, 64, 128, 192, 256):
        layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.GroupNorm(8, c),
                   nn.ReLU(inplace=True),
                   nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.GroupNorm(8, c),
                   nn.ReLU(inplace=True)]
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
            window_size=[window, window],
            stochastic_depth_prob=0.2)                    # drop-path 0.2, as the authors
        self.features, self.norm = swin.features, swin.norm

    def forward(self, x):
        return self.norm(self.features(x)).permute(0, 3, 1, 2)            # (B, 1024, H/32, W/32)


class ViTDetB(nn.Module):
    """ViT-B/16 as the paper uses it (supplementary A, after ViTDet): torchvision's blocks, so that
    its ImageNet weights load, with attention inside 14 x 14 windows except in blocks 2, 5, 8 and 11
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
        self.drop = nn.ModuleList(torchvision.ops.StochasticDepth(drop_path * i / (n - 1), "row")
                                  for i in range(n))
        LayerNorm2d = torchvision.models.convnext.LayerNorm2d
        self.neck = nn.Sequential(nn.MaxPool2d(2),
                                  nn.Conv2d(768, 256, 1, bias=False), LayerNorm2d(256),
                                  nn.Conv2d(256, 256, 3, padding=1, bias=False), LayerNorm2d(256))

    def forward(self, x):
        x = self.conv_proj(x)                                       # (B, 768, h, w), stride 16
        B, C, h, w = x.shape
        pos = self.encoder.pos_embedding[:, 1:]                           # drop the class token's
        g = math.isqrt(pos.shape[1])
        pos = pos.reshape(1, g, g, C).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic")
        x = (x + pos).permute(0, 2, 3, 1)                                 # (B, h, w, 768)
        for i, (block, drop) in enumerate(zip(self.encoder.layers, self.drop)):
            if i in self.global_blocks:
                x = vit_block(block, x.flatten(1, 2), drop).view(B, h, w, C)
            else:
                x = self.windowed(block, x, drop)
        return self.neck(self.encoder.ln(x).permute(0, 3, 1, 2))         # (B, 256, H/32, W/32)

    def windowed(self, block, x, drop):
        """The block inside non-overlapping windows: (B, h, w, C) padded to whole windows."""
        B, h, w, C = x.shape
        s = self.window
        x = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
        H, W = x.shape[1:3]
        windows = x.view(B, H // s, s, W // s, s, C).transpose(2, 3)
        x = windows.reshape(-1, s * s, C)                           # (B * windows, s * s, C)
        x = vit_block(block, x, drop)
        x = x.view(B, H // s, W // s, s, s, C).transpose(2, 3).reshape(B, H, W, C)
        return x[:, :h, :w]


def vit_block(block, x, drop):
    """torchvision's ViT EncoderBlock on x (N, L, C), with drop-path on both residual branches."""
    y = block.ln_1(x)
    y = block.self_attention(y, y, y, need_weights=False)[0]
    x = x + drop(block.dropout(y))
    return x + drop(block.mlp(block.ln_2(x)))


BACKBONES = {"tiny": tiny_backbone, "r50": resnet50_backbone, "swin_b": lambda: (SwinB(), 1024),
             "swin_b384": lambda: (SwinB(window=12), 1024), "vit_b": lambda: (ViTDetB(), 256)}


def sine_positions(padding, d):
    """2-D sine position encoding, normalized to the unpadded image (as DETR).
    padding (B, h, w) True at padding -> (B, h*w, d)."""
    inside = (~padding).float()
    # (B, h, w) in (0, 2pi]
    y = inside.cumsum(1) / (inside.cumsum(1)[:, -1:, :] + 1e-6) * 2 * math.pi
    x = inside.cumsum(2) / (inside.cumsum(2)[:, :, -1:] + 1e-6) * 2 * math.pi
    freq = 10000 ** (2 * (torch.arange(d // 4, device=padding.device) / (d // 2)))   # (d/4,)

    def encode(v):                                                    # (B, h, w) -> (B, h, w, d/2)
        v = v[..., None] / freq
        return torch.cat([v.sin(), v.cos()], dim=-1)
    return torch.cat([encode(y), encode(x)], dim=-1).flatten(1, 2)    # (B, h*w, d)


def coordinate_embeddings(num_bins, d):
    """Initial embeddings of the num_bins + 1 coordinate tokens: a sine code of the bin's position
    (frequencies 0.5 .. num_bins / 4 cycles per image), scaled to the norm of an N(0, 1) row. Nearby
    bins start similar, so a box prompt says where it is, and a near miss of the token head scores
    better than a far one, from the first step. -> (num_bins + 1, d)"""
    x = (torch.arange(num_bins + 1) + 0.5) / num_bins                 # bin centres in [0, 1]
    freq = 0.5 * (num_bins / 2) ** torch.linspace(0, 1, d // 2)       # (d/2,) cycles per image
    angle = 2 * math.pi * x[:, None] * freq                           # (bins + 1, d/2)
    return torch.cat([angle.sin(), angle.cos()], 1) * math.sqrt(2)    # rows of norm sqrt(d)


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention. Positions are added by the caller
    to the query/key inputs, never to the values. `attend` (broadcast to (B, heads, Lq, Lk)) is
    True where a query may look."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def split(self, x):                                   # (B, L, d) -> (B, heads, L, d/heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, q, k, v, attend=None):
        q, k, v = self.split(self.q(q)), self.split(self.k(k)), self.split(self.v(v))
        dropout = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.out(x.transpose(1, 2).flatten(2))     # (B, Lq, d)


def dropout_layer(p):
    return nn.Dropout(p) if p > 0 else nn.Identity()     # p = 0: not even a copy


class FFN(nn.Sequential):
    def __init__(self, d, hidden, dropout):
        super().__init__(nn.Linear(d, hidden), nn.ReLU(inplace=True), dropout_layer(dropout),
                         nn.Linear(hidden, d))


class EncoderLayer(nn.Module):
    """Post-norm: x = norm(x + attn(x + pos, x + pos, x)); x = norm(x + ffn(x)). Dropout (as the
    authors' detrex layers): on the attention weights and in and after the FFN, not after
    attention."""

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.attn, self.ffn = Attention(d, heads, dropout), FFN(d, ffn, dropout)
        self.norm1, self.norm2, self.drop = nn.LayerNorm(d), nn.LayerNorm(d), dropout_layer(dropout)

    def forward(self, x, pos, attend):
        q = x + pos
        x = self.norm1(x + self.attn(q, q, x, attend))
        return self.norm2(x + self.drop(self.ffn(x)))


class Memory(NamedTuple):
    """The encoded image that every task decodes against."""
    tokens: torch.Tensor             # (B, hw, d) encoder output: the values of cross-attention
    keys: torch.Tensor               # (B, hw, d) tokens + image positions: its keys
    attend: torch.Tensor             # (B, 1, 1, hw) True where a token is image, False at padding


class DecoderLayer(nn.Module):
    """Post-norm: self-attention -> norm -> cross-attention -> norm -> FFN -> norm (3.3).

    Self-attention runs per sequence: the n sequences of each image are folded into the batch,
    x is (B*n, L, d). Cross-attention unfolds them into one query list per image, (B, n*L, d),
    against that image's memory (B, hw, d): no sequence gets its own copy of the memory.
    Sequence positions `pos` (L, d) go to the self-attention queries/keys and cross-attention
    queries.
    Dropout as in EncoderLayer: attention weights and FFN, not the attention outputs.
    """

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(d, heads, dropout), Attention(d, heads, dropout)
        self.ffn = FFN(d, ffn, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = dropout_layer(dropout)

    def forward(self, x, pos, memory):
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, x))         # bi-directional: no causal mask
        return self.cross_attention_and_ffn(x, pos, memory)

    def cross_attention_and_ffn(self, x, pos, memory):
        (Bn, L, d), B = x.shape, memory.tokens.shape[0]
        q = (x + pos).reshape(B, -1, d)                               # (B, n*L, d)
        y = self.cross_attn(q, memory.keys, memory.tokens, memory.attend)
        x = self.norm2(x + y.reshape(Bn, L, d))                       # back to (B*n, L, d)
        return self.norm3(x + self.drop(self.ffn(x)))


class MAD(nn.Module):
    """Backbone + encoder + bi-directional decoder + token head over one shared vocabulary.
    forward is masked training (3.2), predict is masked inference (3.2, 4.1). The ablation
    variants of the config (Tables 3 and 7, the inference details) are chosen here, once."""

    def __init__(self, cfg: Config, vocab: Vocab, backbone=None):
        super().__init__()
        self.cfg, self.vocab = cfg, vocab
        d = cfg.d_model
        self.backbone, channels = backbone or BACKBONES[cfg.backbone]()
        self.proj = nn.Conv2d(channels, d, 1)
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.heads, cfg.ffn, cfg.dropout)
                                     for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d, cfg.heads, cfg.ffn, cfg.dropout)
                                     for _ in range(cfg.dec_layers))
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)                    # as the authors' code
        self.dec_norm = nn.LayerNorm(d)                     # shared by every decoder layer's output
        self.embed = nn.Embedding(vocab.size, d)            # input tokens AND the head's weights
        if cfg.sine_coords:
            with torch.no_grad():
                self.embed.weight[vocab.coord:vocab.vis] = coordinate_embeddings(vocab.num_bins, d)
        body = max(BOX_LEN * cfg.num_queries, cfg.grid_size ** 2, KPT_LEN, cfg.caption_len)
        # learned positions, shared by all tasks, on the scale of the token embeddings (N(0, 1), as
        # DETR's query embeddings): in a fully masked sequence they are all that tells slots apart.
        # The AR baseline's input (prompt, <start>, the target but its last token) is as long.
        self.seq_pos = nn.Parameter(torch.randn(PROMPT_LEN + body, d))
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        # the ablation variants, chosen once here (each dict lists the choices; the defaults:
        # one partly masked copy at mask_ratio, one random word in the fully masked caption,
        # halving over caption stages (tiny: a running mean), p(class) over every detection token)
        self.partial_masks = partial(PARTIAL_MASKS[cfg.mask_strategy], ratio=cfg.mask_ratio)
        self.fully_masked_caption = FULL_CAPTION_COPIES[cfg.cap_full_word]
        self.ensemble_weight = ENSEMBLE_WEIGHTS[cfg.remask_average]
        self.detection_probs = DETECTION_SCORES[cfg.det_score]

    def encode(self, images, padding):
        """images (B, 3, H, W) uint8 RGB, padding (B, H, W) True at padding -> Memory. The images
        are normalized here, on their device (ImageNet statistics; padding 0)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"MAD takes uint8 images (B, 3, H, W) and normalizes them itself, "
                            f"not {images.dtype}")
        x = images.float().div(255).sub(self.mean).div(self.std).masked_fill(padding[:, None], 0.0)
        f = self.proj(self.backbone(x))                                   # (B, d, h, w)
        padding = F.interpolate(padding[:, None].float(), size=f.shape[-2:])
        padding = padding[:, 0].bool()                                    # (B, h, w)
        pos = sine_positions(padding, f.shape[1])                         # (B, hw, d)
        x = f.flatten(2).transpose(1, 2)                                  # (B, hw, d)
        attend = ~padding.flatten(1)[:, None, None, :]                    # (B, 1, 1, hw)
        for layer in self.encoder:
            x = layer(x, pos, attend)
        return Memory(x, x + pos, attend)

    def decode(self, tokens, memory, all_layers=False):
        """tokens (B, n, L) -> hidden states after the shared final norm: (B, n, L, d), or
        (layers, B, n, L, d) with all_layers (the auxiliary losses on every layer's output)."""
        B, n, L = tokens.shape
        x = self.embed(tokens).flatten(0, 1)                              # (B*n, L, d)
        pos = self.seq_pos[:L]                                            # (L, d)
        outs = []
        for layer in self.decoder:
            x = self.run_layer(layer, x, pos, memory)
            if all_layers:
                outs.append(x)
        if not all_layers:
            return self.dec_norm(x).view(B, n, L, -1)
        return self.dec_norm(torch.stack(outs)).view(len(outs), B, n, L, -1)

    def run_layer(self, layer, x, pos, memory):
        """One decoder layer (a hook: the AR baseline overrides it with a causal one)."""
        return layer(x, pos, memory)

    def logits(self, h, task):
        """Token head: cosine similarity between the MLP output and the embeddings of the task's
        allowed tokens only, times a learned temperature. h (..., d) -> (..., hi - lo)."""
        lo, hi = self.vocab.task_range(task)
        z = F.normalize(self.head(h), dim=-1)
        w = F.normalize(self.embed.weight[lo:hi], dim=-1)
        return z @ w.t() * self.logit_scale.exp()

    def log_probs(self, prompt, inputs, memory, task):
        """Every decoder layer's prediction: prompt (B, n, PROMPT_LEN), inputs (B, n, L) ->
        log-probs over the task's tokens (layers, B, n, L, V)."""
        h = self.decode(torch.cat([prompt, inputs], -1), memory, all_layers=True)
        return self.logits(h[..., PROMPT_LEN:, :], task).log_softmax(-1)

    def forward(self, batch, tasks=TASKS):
        """3.2 masked training. batch: data.collate's dict (keys in data.py). Returns two dicts
        {task: (layers,) tensor}, sums and counts: each decoder layer's summed cross-entropy over
        its masked targets, and their number; weighted_loss turns them into eq. 1 (train.py counts
        over all processes)."""
        memory = self.encode(batch["images"], batch["padding"])   # the image is encoded once (3.4)
        # detection last: its matching waits for the device, best with the other tasks' work queued
        out = {t: LOSSES[t](self, batch, memory) for t in sorted(tasks, key=lambda t: t == "det")}
        return {t: s for t, (s, _) in out.items()}, {t: c for t, (_, c) in out.items()}

    def loss(self, batch, tasks=TASKS):
        """Eq. 1 on one process: (total, {task: loss})."""
        return weighted_loss(*self(batch, tasks), self.cfg.task_weights)

    @torch.no_grad()
    def predict(self, images, padding, orig_sizes, tasks=TASKS, tokenizer=None):
        """3.2 / 4.1 masked inference: detection, then segmentation and keypoints prompted by the
        detections, then captions. images (B, 3, H, W), padding (B, H, W), orig_sizes (B, 2) as
        (h, w) of the original images. Returns one dict per image (predict_from)."""
        memory = self.encode(images, padding)
        det = detect(self, memory) if {"det", "seg", "kpt"} & set(tasks) else None
        return self.predict_from(memory, det, orig_sizes, tasks, tokenizer)

    def predict_from(self, memory, det, orig_sizes, tasks, tokenizer=None):
        """The tasks of `tasks` given the memory and detections `det` (detect's dict). One dict per
        image, on the memory's device:
          boxes (Q, 4) xyxy original pixels, scores (Q,), labels (Q,)   sorted by score
          masks (K, H0, W0) bool for the first K = min(seg_topk, Q) detections
          keypoints (P, 17, 3) x, y, p(visible) for person detections; kpt_index (P,) into boxes
          caption str (caption_ids (L,) without a tokenizer)
        One synchronization at the end; moving the masks to the CPU is the caller's."""
        sizes = orig_sizes.tolist()                                       # (h, w) of each image
        res = {}
        if det is not None:
            res.update(boxes=to_pixels(det["box_tokens"], orig_sizes, self.vocab),
                       scores=det["scores"], labels=det["labels"])
        if "seg" in tasks:
            res["masks"] = segment(self, det, memory, res["boxes"], sizes)
        if "kpt" in tasks and self.vocab.person >= 0:
            res.update(person_keypoints(self, det, memory, orig_sizes))
        if "cap" in tasks:
            res["caption_ids"] = caption(self, memory)            # (B, L) SentencePiece ids
        out = [{k: v[b] for k, v in res.items()} for b in range(len(sizes))]
        for o in out:
            if "keypoints" in o:
                persons = o.pop("kpt_is_person")
                o["keypoints"], o["kpt_index"] = o["keypoints"][persons], o["kpt_index"][persons]
            if "caption_ids" in o and tokenizer:
                o["caption"] = tokenizer.decode(o.pop("caption_ids").tolist())
        return out

    def decode_sequences(self, prompt, L, memory, task, ratios, remask_order=None):
        """prompt (B, n, PROMPT_LEN) -> logits (B, n, L, V) of the sequences: masked inference
        (a hook: the AR baseline overrides it with greedy left-to-right decoding)."""
        return refine(self, prompt, L, memory, task, ratios, remask_order or random_order)

    def param_groups(self, lr, backbone_lr, weight_decay):
        """AdamW groups: the backbone is fine-tuned with the lower learning rate (supplementary A);
        normalization weights and biases get no weight decay (as in the authors' code)."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        norms = {id(p) for m in self.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                 for p in m.parameters()}
        groups = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in in_backbone, id(p) in norms), []).append(p)
        return [dict(params=ps, lr=backbone_lr if backbone else lr,
                     weight_decay=0.0 if norm else weight_decay)
                for (backbone, norm), ps in sorted(groups.items())]


# -----------------------------------------------------------------------------
# 3.2 Masked training: every task decodes a fully masked and a partly masked copy of its
# sequences in one pass; the loss counts masked positions only (eq. 1)

def random_mask(shape, ratio, device):
    """Bool (..., L), True at exactly round(ratio * L) random positions of each sequence (ratio:
    one number, or a tensor of one per sequence)."""
    rank = torch.rand(shape, device=device).argsort(-1).argsort(-1)
    if torch.is_tensor(ratio):
        return rank < (ratio * shape[-1]).round()[..., None]
    return rank < round(ratio * shape[-1])


# The partly masked copies of sequences (B, n, L), Table 3: (masked (B, P, L), src (P,): the
# sequence each copy is of), from one copy per sequence at mask_ratio ("fixed"), at a ratio drawn
# per sequence in [0.6, 0.8] ("random"), or two copies at 0.6 and 0.8 ("multiple").

def one_copy_at_the_ratio(shape, ratio, device):
    return random_mask(shape, ratio, device), torch.arange(shape[1], device=device)


def one_copy_at_a_random_ratio(shape, ratio, device):
    ratio = torch.empty(shape[:-1], device=device).uniform_(0.6, 0.8)
    return random_mask(shape, ratio, device), torch.arange(shape[1], device=device)


def two_copies_at_two_ratios(shape, ratio, device):
    masked = torch.cat([random_mask(shape, 0.6, device), random_mask(shape, 0.8, device)], 1)
    return masked, torch.arange(shape[1], device=device).repeat(2)


PARTIAL_MASKS = {"fixed": one_copy_at_the_ratio, "random": one_copy_at_a_random_ratio,
                 "multiple": two_copies_at_two_ratios}


def masked_copies(seqs, partial_masks, mask_token):
    """seqs (B, n, L) -> inputs (B, C, L): the n fully masked copies, then the partly masked ones
    (partial_masks); masked (B, C, L) True at <mask>; src (C,): the sequence each copy is of."""
    partial, src = partial_masks(seqs.shape, device=seqs.device)
    masked = torch.cat([torch.ones_like(seqs, dtype=torch.bool), partial], 1)
    src = torch.cat([torch.arange(seqs.shape[1], device=seqs.device), src])
    return torch.where(masked, mask_token, seqs[:, src]), masked, src


def masked_nll(logp, target, weight):
    """Weighted cross-entropy summed per layer, and the weights' sum (the counted positions).
    logp (layers, ..., V); target and weight broadcast to (layers, ...). -> (layers,), (layers,)."""
    target, weight = torch.broadcast_tensors(target, weight.to(logp.dtype))
    target, weight = target.expand(logp.shape[:-1]), weight.expand(logp.shape[:-1])
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return (nll * weight).flatten(1).sum(1), weight.detach().flatten(1).sum(1)


def weighted_loss(sums, counts, task_weights):
    """Eq. 1: per task and decoder layer, the summed cross-entropy over the number of counted
    positions (at least 1), summed over the layers; the total weighs the tasks (supplementary C)."""
    tasks = [t for t in TASKS if t in sums]
    losses = {t: (sums[t] / counts[t].clamp(min=1)).sum() for t in tasks}
    weights = dict(zip(TASKS, task_weights))
    total = sum(weights[t] * losses[t] for t in tasks)
    return total, {t: loss.detach() for t, loss in losses.items()}


def detection_loss(model, batch, memory):
    """Detection: the slots' targets come from Hungarian matching (match_detections)."""
    v = model.vocab
    seqs = batch["det_seq"].flatten(1)[:, None]                       # (B, 1, 5Q): one sequence
    inputs, masked, _ = masked_copies(seqs, model.partial_masks, v.mask_token)   # (B, C, 5Q)
    prompt = v.det_prompt.to(seqs.device).expand(*inputs.shape[:2], PROMPT_LEN)
    logp = model.log_probs(prompt, inputs, memory, "det")             # (layers, B, C, 5Q, V)
    target, weight = match_detections(logp, inputs, masked, batch["det_gt"], v)
    return masked_nll(logp, target, weight * masked)


def prompted_loss(model, batch, memory, task):
    """Segmentation and keypoints: the prompt (task token, box, class) fixes the target, so no
    matching. prompt (B, S, PROMPT_LEN), sequences and weights (B, S, L)."""
    prompt, seqs, weight = batch[f"{task}_prompt"], batch[f"{task}_seq"], batch[f"{task}_weight"]
    # (B, C, L): C copies of each sequence
    inputs, masked, src = masked_copies(seqs, model.partial_masks, model.vocab.mask_token)
    logp = model.log_probs(prompt[:, src], inputs, memory, task)      # (layers, B, C, L, V)
    target = seqs[:, src] - model.vocab.task_range(task)[0]
    return masked_nll(logp, target, weight[:, src] * masked)


def caption_loss(model, batch, memory):
    """Captioning: the fully masked copy is ONE sequence per image, trained towards the reference
    it predicts best (best_reference, per layer); the partly masked copies hold every reference,
    with one random visible token of each replaced by a random text token (3.1 sequence
    augmentation)."""
    v, refs, weight = model.vocab, batch["cap_seq"], batch["cap_weight"]   # (B, R, L)
    lo = v.task_range("cap")[0]
    masked, src = model.partial_masks(refs.shape, device=refs.device)      # (B, P, L)
    noisy = replace_one_visible_word(torch.where(masked, v.mask_token, refs[:, src]), masked, v)
    full = model.fully_masked_caption(refs, v)                              # (B, 1, L)
    inputs = torch.cat([full, noisy], 1)                                    # (B, 1+P, L)
    prompt = v.cap_prompt.to(refs.device).expand(*inputs.shape[:2], PROMPT_LEN)
    logp = model.log_probs(prompt, inputs, memory, "cap")                   # (layers, B, 1+P, L, V)
    target = refs - lo
    counted = weight * (full == v.mask_token)
    full_target, full_weight = best_reference(logp[:, :, 0], target, counted)   # (layers, B, L)
    layers = len(logp)
    target = torch.cat([full_target[:, :, None],
                        target[:, src].expand(layers, -1, -1, -1)], 2)       # (layers, B, 1+P, L)
    weight = torch.cat([full_weight[:, :, None],
                        (weight[:, src] * masked).expand(layers, -1, -1, -1)], 2)
    return masked_nll(logp, target, weight)


def replace_one_visible_word(copies, masked, vocab):
    """3.1 sequence augmentation: in each partly masked caption copy (B, P, L), one visible
    position, drawn at random, shows a random text token instead of its own."""
    lo, hi = vocab.task_range("cap")
    visible = torch.rand(masked.shape, device=masked.device) * ~masked
    pick = visible.argmax(-1, keepdim=True)                # a visible position (any if none)
    word = torch.randint(lo, hi, (*masked.shape[:2], 1), device=masked.device)
    word = torch.where(masked.gather(-1, pick), vocab.mask_token, word)   # none visible: keep
    return copies.scatter(-1, pick, word)


def all_masked_caption(refs, vocab):

    """The fully masked caption copy (B, 1, L): every position <mask>."""
    return torch.full_like(refs[:, :1], vocab.mask_token)


def all_masked_caption_but_one_word(refs, vocab):
    """The fully masked caption copy with one random position showing a random word (the authors'
    code): an input, so not a target."""
    (B, _, L), (lo, hi) = refs.shape, vocab.task_range("cap")
    where = torch.randint(0, L, (B, 1, 1), device=refs.device)
    word = torch.randint(lo, hi, (B, 1, 1), device=refs.device)
    return all_masked_caption(refs, vocab).scatter(-1, where, word)


FULL_CAPTION_COPIES = {False: all_masked_caption, True: all_masked_caption_but_one_word}


def best_reference(logp, refs, counted):
    """The target of the fully masked caption copy: per layer and image, the reference of lowest
    mean cross-entropy over its counted positions (a reference with none is never chosen).
    logp (layers, B, L, V), refs and counted (B, R, L) -> target and weight (layers, B, L)."""
    layers, (_, R, L) = len(logp), refs.shape
    index = refs[None, ..., None].expand(layers, -1, -1, -1, 1)         # (layers, B, R, L, 1)
    nll = -logp[:, :, None].expand(-1, -1, R, -1, -1).gather(-1, index)[..., 0]  # (layers, B, R, L)
    mean = (nll * counted).sum(-1) / counted.sum(-1).clamp(min=1)                # (layers, B, R)
    best = mean.masked_fill(counted.sum(-1) == 0, float("inf")).argmin(-1)       # (layers, B)
    idx = best[..., None, None].expand(-1, -1, 1, L)                             # (layers, B, 1, L)

    def pick(x):
        return x.expand(layers, -1, -1, -1).gather(2, idx)[:, :, 0]
    return pick(refs), pick(counted)


@torch.no_grad()
def match_detections(logp, inputs, masked, gt, vocab, forced_cost=1e4):
    """Hungarian matching of detection slots to objects (3.2), as DETR's matcher: one batched cost
    matrix, moved to the CPU once, scipy per (layer, image, copy). cost(slot, obj) = mean over the
    5 tokens of -log p(obj's token); at a visible position the prediction is the visible token
    itself (cost 0 if it is obj's, else forced_cost), so a slot showing an object is matched to it.
    logp (layers, B, C, 5Q, V); inputs and masked (B, C, 5Q); gt: B tensors (n_b, 5) of tokens.
    -> target (layers, B, C, 5Q) indices within the detection range, and weight: matched slots
    learn their object's 5 tokens, the others class <noise> (coordinates weight 0)."""
    (n_layers, B, copies, T, V), lo = logp.shape, vocab.task_range("det")[0]
    Q, sizes = T // BOX_LEN, [len(g) for g in gt]
    gt_pad = torch.zeros(B, max(sizes + [1]), BOX_LEN, dtype=torch.long, device=logp.device)
    for b, g in enumerate(gt):
        gt_pad[b, : len(g)] = g.to(logp.device) - lo                  # (B, G, 5) local ids
    idx = gt_pad.transpose(1, 2)[None, :, None, None].expand(n_layers, B, copies, Q, BOX_LEN, -1)
    nll = -logp.view(n_layers, B, copies, Q, BOX_LEN, V).gather(-1, idx)   # (layers, B, C, Q, 5, G)
    slots = inputs.view(B, copies, Q, BOX_LEN, 1) - lo
    shown = slots == gt_pad.transpose(1, 2)[:, None, None]            # (B, C, Q, 5, G)
    visible = ~masked.view(B, copies, Q, BOX_LEN, 1)
    nll = torch.where(visible, (~shown).to(nll.dtype) * forced_cost, nll)
    cost = nll.mean(4).float().cpu()                                  # (layers, B, C, Q, G)
    # for scipy; the loss check stops a run on NaN
    cost = cost.nan_to_num(nan=1e9, posinf=1e9, neginf=-1e9)
    target = torch.zeros(n_layers, B, copies, Q, BOX_LEN, dtype=torch.long)
    target[..., 4] = vocab.noise - lo                                 # unmatched: <noise>
    weight = torch.zeros(n_layers, B, copies, Q, BOX_LEN)
    weight[..., 4] = 1
    gt_pad = gt_pad.cpu()
    for layer, b, k in itertools.product(range(n_layers), range(B), range(copies)):
        if sizes[b]:
            slot, obj = linear_sum_assignment(cost[layer, b, k, :, : sizes[b]])
            slot, obj = torch.as_tensor(slot), torch.as_tensor(obj)
            target[layer, b, k, slot] = gt_pad[b, obj]
            weight[layer, b, k, slot] = 1
    return target.flatten(3).to(logp.device), weight.flatten(3).to(logp.device)


LOSSES = dict(det=detection_loss, seg=partial(prompted_loss, task="seg"),
              kpt=partial(prompted_loss, task="kpt"), cap=caption_loss)


# -----------------------------------------------------------------------------
# 3.2 / 4.1 Masked inference: detection -> segmentation and keypoints prompted by the
# detections -> captioning. One stage (ratio 1.0) is pure parallel decoding.

def refine(model, prompt, L, memory, task, ratios, remask_order):
    """Masked inference (3.2). Stage 1 decodes from all-<mask>; each later stage re-masks a share
    `ratio` of the positions of the current argmax tokens, first in `remask_order` (random_order,
    or visibility_order for keypoints), and decodes again; at re-masked positions the new logits
    join the ensemble (model.ensemble_weight). The random positions come from a fixed seed
    and are the same for every image, so a prediction does not depend on the batch or the number
    of processes it was made in. prompt (B, n, PROMPT_LEN) -> logits (B, n, L, V) over the task's
    tokens."""
    B, n, _ = prompt.shape
    v, lo = model.vocab, model.vocab.task_range(task)[0]
    tokens = torch.full((B, n, L), v.mask_token, device=prompt.device)
    conf = torch.zeros(B, n, L, device=prompt.device)
    logits, count = 0, torch.zeros(B, n, L, 1, device=prompt.device)
    g = torch.Generator().manual_seed(0)
    for ratio in ratios:
        remask = remask_order(conf, g).argsort(-1).argsort(-1) < round(ratio * L)   # (B, n, L)
        x = torch.where(remask, v.mask_token, tokens)
        h = model.decode(torch.cat([prompt, x], -1), memory)[..., PROMPT_LEN:, :]
        new = model.logits(h, task)
        m = remask[..., None].float()
        logits = logits + (new - logits) * model.ensemble_weight(count) * m
        count = count + m
        conf, tokens = allowed(logits, task, v).softmax(-1).max(-1)
        tokens = tokens + lo
    return logits


def random_order(conf, generator):
    """Positions in one random order, the same for every sequence (the seeded generator)."""
    return torch.rand(conf.shape[-1], generator=generator).to(conf.device).expand_as(conf)


def visibility_order(conf, generator):
    """Keypoint positions (conf (B, n, 51)), as the authors re-mask them: each keypoint's x and y
    by the confidence of its visibility token, least confident first; the visibility tokens
    last (confidence 1)."""
    per_point = conf.unflatten(-1, (NUM_KEYPOINTS, 3))                # (B, n, 17, 3)
    order = per_point[..., 2:].expand_as(per_point).clone()
    order[..., 2] = 1.0
    return order.flatten(-2)


# The weight of a re-masked position's new logits, given how often it was decoded before
# (Table 7's ensemble): a running mean of the stages, or the authors' captions'
# (ensemble + new) / 2, under which later stages weigh more.

def running_mean_weight(count):
    return 1 / (count + 1)


def halving_weight(count):
    return 0.5 + 0.5 * (count == 0)


ENSEMBLE_WEIGHTS = {"running": running_mean_weight, "halve": halving_weight}


def allowed(logits, task, vocab, offset=0):
    """Only the tokens that can stand at each position (others -> -inf), so that argmax tokens
    fed back into the decoder are well formed: detection x0..y1 coordinates and class
    (a real class or <noise>) at the 5th; keypoint x, y coordinates and <vis>/<invis> at the 3rd.
    logits (..., L, V) for positions offset..offset+L-1."""
    if task not in ("det", "kpt"):
        return logits
    pos = torch.arange(offset, offset + logits.shape[-2], device=logits.device)
    tok = torch.arange(logits.shape[-1], device=logits.device)
    if task == "det":                # det range: classes, <noise>, coordinates
        ok = (pos[:, None] % BOX_LEN == 4) == (tok[None] < vocab.num_classes + 1)
    else:                            # kpt range: coordinates, <vis>, <invis>
        ok = (pos[:, None] % 3 == 2) == (tok[None] >= vocab.num_bins + 1)
    return logits.masked_fill(~ok, float("-inf"))


def detect(model, memory):
    """One fully masked pass over the detection sequence. Returns, sorted by score (B, Q, ...):
    box tokens (x0 <= x1, y0 <= y1), scores, labels."""
    B, Q, C, v = len(memory.tokens), model.cfg.num_queries, model.vocab.num_classes, model.vocab
    prompt = v.det_prompt.to(memory.tokens.device).expand(B, 1, PROMPT_LEN)
    logits = model.decode_sequences(prompt, BOX_LEN * Q, memory, "det", (1.0,))
    prob = model.detection_probs(logits, v).view(B, Q, BOX_LEN, -1)   # (B, Q, 5, V)
    coords = prob[:, :, :4, C + 1:].argmax(-1) + v.coord              # (B, Q, 4) coordinate tokens
    coords = torch.cat([torch.minimum(coords[..., :2], coords[..., 2:]),
                        torch.maximum(coords[..., :2], coords[..., 2:])], -1)
    scores, labels = prob[:, :, 4, :C].max(-1)                        # low if <noise> is likely
    order = scores.argsort(-1, descending=True)
    return dict(box_tokens=coords.gather(1, order[..., None].expand_as(coords)),
                scores=scores.gather(1, order), labels=labels.gather(1, order))


# The class score of a detection: p(class) with the softmax over every detection token ("all":
# likely coordinates at the class position lower it), or over the classes and <noise> only
# ("classes").

def softmax_over_all_detection_tokens(logits, vocab):
    return logits.softmax(-1)


def softmax_over_allowed_tokens(logits, vocab):
    return allowed(logits, "det", vocab).softmax(-1)


DETECTION_SCORES = {"all": softmax_over_all_detection_tokens,
                    "classes": softmax_over_allowed_tokens}


def box_prompts(det, task_token, index, vocab):
    """Prompts [task, x0, y0, x1, y1, class] (B, K, PROMPT_LEN) from the detections at index
    (B, K)."""
    boxes = det["box_tokens"].gather(1, index[..., None].expand(-1, -1, 4))
    cls = det["labels"].gather(1, index)[..., None] + vocab.cls
    return torch.cat([torch.full_like(cls, task_token), boxes, cls], -1)


def segment(model, det, memory, boxes, sizes):
    """Masks of the top-K detections: p(<fg>) on the grid, pasted into each box on the original
    image of size sizes[b] = (h, w) (B lists of (K, h, w) bool)."""
    K, M = min(model.cfg.seg_topk, det["scores"].shape[1]), model.cfg.grid_size
    index = torch.arange(K, device=boxes.device).expand(len(boxes), K)
    prompt = box_prompts(det, model.vocab.seg, index, model.vocab)
    logits = model.decode_sequences(prompt, M * M, memory, "seg", (1.0,))
    prob = allowed(logits, "seg", model.vocab).softmax(-1)[..., 0]    # (B, K, M*M) p(<fg>)
    prob = prob.view(-1, K, M, M).float()
    return [paste_masks(p, b, h, w) for p, b, (h, w) in zip(prob, boxes[:, :K], sizes)]


def person_keypoints(model, det, memory, orig_sizes):
    """Keypoints of K detections (K = seg_topk, at most Q), persons first by score;
    kpt_is_person marks the persons, the only ones predict keeps. Decoding a fixed K keeps every
    batch's shapes equal, whatever its number of persons."""
    v, K = model.vocab, min(model.cfg.seg_topk, det["scores"].shape[1])
    is_person = det["labels"] == v.person                             # (B, Q), sorted by score
    index = (~is_person).float().argsort(dim=-1, stable=True)[:, :K]  # persons first, by score
    logits = model.decode_sequences(box_prompts(det, v.kpt, index, v), KPT_LEN, memory, "kpt",
                                    model.cfg.kpt_ratios, visibility_order)
    prob = allowed(logits, "kpt", v).softmax(-1)
    xy, vis = keypoints_from_probs(prob, v)             # (B, K, 17, 2) tokens, (B, K, 17)
    xy = to_pixels(xy.flatten(2), orig_sizes, v).unflatten(2, (NUM_KEYPOINTS, 2))
    return dict(keypoints=torch.cat([xy, vis[..., None]], -1), kpt_index=index,
                kpt_is_person=is_person.gather(1, index))


def caption(model, memory):
    """Caption tokens (B, L) of the multi-stage masked inference (SentencePiece ids)."""
    B = len(memory.tokens)
    prompt = model.vocab.cap_prompt.to(memory.tokens.device).expand(B, 1, PROMPT_LEN)
    logits = model.decode_sequences(prompt, model.cfg.caption_len, memory, "cap",
                                    model.cfg.cap_ratios)
    return logits[:, 0].argmax(-1)


def keypoints_from_probs(prob, vocab):
    """(B, K, 51, V) keypoint probabilities -> x, y coordinate tokens (B, K, 17, 2) and p(<vis>)
    (B, K, 17)."""
    nb = vocab.num_bins
    prob = prob.unflatten(2, (NUM_KEYPOINTS, 3))
    xy = prob[..., :2, : nb + 1].argmax(-1) + vocab.coord
    vis = prob[..., 2, nb + 1] / prob[..., 2, nb + 1:].sum(-1).clamp(min=1e-12)
    return xy, vis


def to_pixels(coords, orig_sizes, vocab):
    """Coordinate tokens (B, n, 2k) alternating x, y -> bin centres in pixels of the original
    images (B, n, 2k): x by the width, y by the height. Boxes keep their corner order."""
    wh = orig_sizes.flip(-1).to(coords.device, torch.float32)[:, None, None]   # (B, 1, 1, 2)
    return (vocab.dequantize(coords).unflatten(-1, (-1, 2)) * wh).flatten(-2)


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
        distance = (u.clamp(0, m - 1)[..., None] - torch.arange(m, device=lo.device)).abs()
        w = (1 - distance).clamp(min=0)
        return w * inside[..., None]
    M = prob.shape[-1]
    out = torch.empty(len(prob), H, W, dtype=torch.bool, device=prob.device)
    for i in range(0, len(prob), chunk):               # chunks bound the float memory to chunk*H*W
        b = boxes[i:i + chunk].float()
        wy, wx = weights(b[:, 1], b[:, 3], H, M), weights(b[:, 0], b[:, 2], W, M)
        out[i:i + chunk] = wy @ prob[i:i + chunk] @ wx.transpose(1, 2) >= 0.5
    return out


# Table 8's single-task models have no detector: their segmentation and keypoints are prompted by
# given boxes (the ground truth in evaluate.py: an oracle, whose AP assumes perfect boxes).

@torch.no_grad()
def predict_from_boxes(model, images, padding, orig_sizes, boxes, tasks, tokenizer=None):
    """MAD.predict with B tensors (n, 5) [x0, y0, x1, y1 original pixels, class] in place of the
    detections; each image's outputs keep its own n boxes."""
    memory = model.encode(images, padding)
    det = given_detections(boxes, orig_sizes, model.vocab, images.device)
    out = model.predict_from(memory, det, orig_sizes, tasks, tokenizer)
    return [only_given(o, len(b)) for o, b in zip(out, boxes)]


def given_detections(boxes, orig_sizes, vocab, device):
    """Given boxes -> detect's dict, padded to the most boxes of the batch with rows of score 0."""
    n = max([len(b) for b in boxes] + [1])
    given = torch.zeros(len(boxes), n, BOX_LEN)
    for i, b in enumerate(boxes):
        given[i, :len(b)] = b
    wh = orig_sizes.flip(-1).float().repeat(1, 2)[:, None]           # (B, 1, 4) as w, h, w, h
    scores = (torch.arange(n) < torch.tensor([len(b) for b in boxes])[:, None]).float()
    return dict(box_tokens=vocab.quantize(given[..., :4] / wh).to(device), scores=scores.to(device),
                labels=given[..., 4].long().to(device))


def only_given(o, n):
    """One image's prediction from given_detections without its padding rows."""
    o.update({k: o[k][:n] for k in ("boxes", "scores", "labels", "masks") if k in o})
    if "keypoints" in o:
        given = o["kpt_index"] < n
        o["keypoints"], o["kpt_index"] = o["keypoints"][given], o["kpt_index"][given]
    return o


# -----------------------------------------------------------------------------
# Table 2 / supplementary B: the autoregressive baseline. The same network, weights and sequences;
# causal self-attention, <start> first, next-token teacher forcing, detection objects first
# (pix2seq order). <end> is not trained: decoding always runs to each task's full length (as the
# paper times it), so it would never be read.

class ARBaseline(MAD):
    """MAD's network decoding autoregressively: cfg.decoder == "ar"."""

    def run_layer(self, layer, x, pos, memory, cache=None):
        q = x + pos
        x = layer.norm1(x + causal_self_attention(layer.self_attn, q, x, cache))
        return layer.cross_attention_and_ffn(x, pos, memory)

    def forward(self, batch, tasks=TASKS):
        """Teacher forcing: (sums, counts) as MAD.forward, of next-token cross-entropy."""
        memory = self.encode(batch["images"], batch["padding"])
        out = {}
        for task in sorted(tasks, key=lambda t: t == "det"):
            prompt, seqs, weight = ar_sequences(batch, task, self.vocab)   # (B, n, 6), (B, n, L) x2
            start = torch.full_like(seqs[..., :1], self.vocab.start)
            h = self.decode(torch.cat([prompt, start, seqs[..., :-1]], -1), memory, all_layers=True)
            # (layers, B, n, L, V)
            logp = self.logits(h[..., PROMPT_LEN:, :], task).log_softmax(-1)
            out[task] = masked_nll(logp, seqs - self.vocab.task_range(task)[0], weight)
        return {t: s for t, (s, _) in out.items()}, {t: c for t, (_, c) in out.items()}

    def decode_sequences(self, prompt, L, memory, task, ratios=None, remask_order=None):
        return self.generate(prompt, L, memory, task)

    def generate(self, prompt, L, memory, task, use_cache=True):
        """Greedy decoding to the full length L, one token per decoder pass, with a key/value cache
        in every self-attention layer (without: re-decode the whole prefix).
        prompt (B, n, PROMPT_LEN) -> logits (B, n, L, V) of the steps, each restricted to the tokens
        allowed there."""
        lo = self.vocab.task_range(task)[0]
        start_token = torch.full_like(prompt[..., :1], self.vocab.start)
        x = torch.cat([prompt, start_token], -1)                          # (B, n, 7)
        caches = [dict() for _ in self.decoder] if use_cache else None
        steps = []
        for t in range(L):
            if use_cache and t == 0:
                h = self.decode_step(x, memory, caches, 0)
            elif use_cache:
                h = self.decode_step(x[..., -1:], memory, caches, PROMPT_LEN + t)
            else:
                h = self.decode(x, memory)
            logits = self.logits(h[..., -1:, :], task)                   # (B, n, 1, V)
            logits = allowed(logits, task, self.vocab, offset=t)
            steps.append(logits)
            x = torch.cat([x, logits.argmax(-1) + lo], -1)
        return torch.cat(steps, 2)

    def decode_step(self, tokens, memory, caches, start):
        """tokens (B, n, l) at sequence positions start.. -> hidden states (B, n, l, d); every
        layer's cache gains their keys and values."""
        B, n, l = tokens.shape
        x = self.embed(tokens).flatten(0, 1)
        pos = self.seq_pos[start:start + l]
        for layer, cache in zip(self.decoder, caches):
            x = self.run_layer(layer, x, pos, memory, cache)
        return self.dec_norm(x).view(B, n, l, -1)


def causal_self_attention(attn, q, x, cache=None):
    """attn's multi-head self-attention, each token attending to itself and the tokens before it;
    `cache` (a dict) holds the keys and values of earlier steps and gains this step's."""
    q, k, v = attn.split(attn.q(q)), attn.split(attn.k(q)), attn.split(attn.v(x))
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        cache["k"], cache["v"] = k, v
    dropout = attn.dropout if attn.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1,   # a cached step sees all
                                       dropout_p=dropout)
    return attn.out(y.transpose(1, 2).flatten(2))


def ar_sequences(batch, task, v):
    """Teacher-forcing sequences of the baseline: (prompt (B, n, PROMPT_LEN), tokens (B, n, L),
    weight)."""

    if task in ("seg", "kpt"):
        return batch[f"{task}_prompt"], batch[f"{task}_seq"], batch[f"{task}_weight"]
    if task == "cap":
        refs = batch["cap_seq"]
        prompt = v.cap_prompt.to(refs.device).expand(*refs.shape[:2], PROMPT_LEN)
        return prompt, refs, batch["cap_weight"]
    slots, gt = batch["det_seq"], batch["det_gt"]                     # (B, Q, 5), B x (n_b, 5)
    B, Q, _ = slots.shape
    most = max([len(g) for g in gt] + [1])
    gt_pad = torch.full((B, most, BOX_LEN), -1, dtype=torch.long, device=slots.device)
    for b, g in enumerate(gt):
        gt_pad[b, : len(g)] = g
    is_gt = (slots[:, :, None] == gt_pad[:, None]).all(-1).any(-1)    # (B, Q)
    order = (~is_gt).float().argsort(dim=-1, stable=True)             # objects first
    seqs = slots.gather(1, order[..., None].expand(-1, -1, BOX_LEN))
    noise = torch.arange(Q, device=slots.device)[None] >= is_gt.sum(1, keepdim=True)   # (B, Q)
    target = seqs.clone()
    target[..., 4] = torch.where(noise, v.noise, seqs[..., 4])        # noise objects -> <noise>
    weight = torch.ones(B, Q, BOX_LEN, device=slots.device)
    weight[..., :4] *= ~noise[..., None]                              # their boxes are not learned
    prompt = v.det_prompt.to(slots.device).expand(B, 1, PROMPT_LEN)
    return prompt, target.flatten(1)[:, None], weight.flatten(1)[:, None]


DECODERS = {"mad": MAD, "ar": ARBaseline}


def build(cfg, vocab):
    """The network of cfg: MAD, or the autoregressive baseline (cfg.decoder == "ar")."""
    return DECODERS[cfg.decoder](cfg, vocab)

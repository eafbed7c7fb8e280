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
from dataclasses import dataclass

import sentencepiece as spm
import torch


# -----------------------------------------------------------------------------
# Configuration: paper defaults (4.1, Table 9); presets in PRESETS.

@dataclass
class Config:
    backbone: str = "r50"            # tiny | r50 | swin_b | vit_b
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
    task_weights: tuple = (1.5, 2.7, 0.5, 0.3)   # det, seg, kpt, cap (supplementary C)
    decoder: str = "mad"             # mad (bi-directional, parallel) | ar (autoregressive baseline)
    kpt_ratios: tuple = (1.0, 0.7)   # masked inference: mask ratio of each stage
    cap_ratios: tuple = (1.0, 0.8, 0.6, 0.4)
    seg_topk: int = 100              # detections that prompt segmentation / keypoints
    image_size: int = 800            # shorter side at test time (longer side <= max_size)
    max_size: int = 1333


PRESETS = {
    "r50": dict(backbone="r50"),
    "swin_b": dict(backbone="swin_b"),
    "vit_b": dict(backbone="vit_b", image_size=1024, max_size=1024),
    # small enough to train on 2 CPU cores in minutes (train.py --demo, tests)
    "tiny": dict(backbone="tiny", d_model=128, enc_layers=2, dec_layers=3, heads=4, ffn=512,
                 num_queries=20, num_bins=128, max_instances=4, image_size=128, max_size=128),
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

    def __init__(self, num_classes, num_bins, num_text):
        self.num_classes, self.num_bins, self.num_text = num_classes, num_bins, num_text
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
        return dict(num_classes=self.num_classes, num_bins=self.num_bins, num_text=self.num_text)


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

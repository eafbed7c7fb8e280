"""COCO multi-task data for MAD: images in, every task's token sequences out.

Paper 3.1 (task tokenization) and 3.4 (task-mixed sampling): each image comes with the targets of
all four tasks that its split has (instances -> detection + segmentation, person_keypoints ->
keypoints, captions -> captioning), built after augmentation as tokens of mad.Vocab:
  COCO's annotations (coco.py reads the three files, checked and merged per image)  ->
  augmentation (flip, multi-scale, crop, LSJ)  ->  the task sequences  ->  collate (pad to a
  multiple of the stride or more, True at padding). Images stay uint8 up to the model, which
  normalizes them.
Also: training the SentencePiece caption model.
"""
import io
import math
import os
import random

import numpy as np
import pycocotools.mask as mask_utils
import sentencepiece as spm
import torch
from PIL import Image, ImageOps
from torchvision.ops import roi_align

from coco import FILES, CocoAnnotations, read_coco_json
from mad import NUM_KEYPOINTS, PROMPT_LEN, TASKS, Vocab

FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]   # keypoint index after a flip


# -----------------------------------------------------------------------------
# 3.1 / 3.4 The dataset: every image with the targets of all the tasks it has (task-mixed sampling)

class CocoMultiTask(torch.utils.data.Dataset):
    """COCO-layout dataset returning (image (3, h, w) uint8, target dict of token sequences).

    root/{split}/*.jpg and root/annotations/{instances,person_keypoints,captions}_{split}.json
    (CocoAnnotations). Target keys (global token ids of vocab; Q = num_queries, S = max_instances,
    M = grid_size, R = max_captions, L = caption_len):
      image_id int, orig_size (2,) original (H, W), size (2,) after augmentation (h, w)
      boxes (n, 4) xyxy augmented pixels, labels (n,)           non-crowd objects, n <= Q
      det_seq (Q, 5) [x0, y0, x1, y1, class] objects in random slots, noise objects elsewhere
      det_gt (n, 5) the objects' tokens, in the order of boxes
      seg_prompt (S, 6) [<seg>, box, class], seg_seq (S, M*M) <fg>/<bg>, seg_weight (S, M*M)
      kpt_prompt (S, 6) [<kpt>, box, person], kpt_seq (S, 51) (x, y, vis) x 17, kpt_weight (S, 51)
      cap_seq (R, L) text tokens, cap_weight (R, L)
    With targets=False (evaluation) only image_id, orig_size and size are built.
    Weights are 0 for padding and for tasks the image or split lacks. Instances with weight come
    first, so collate can trim all-padding rows. Augmentation (train, unless augment=False: the
    fixed evaluation resize) depends only on (seed, epoch, index).
    """

    def __init__(self, root, split, cfg, tokenizer, train, categories=None, skip_bad_images=False,
                 seed=0, augment=None, targets=True):
        self.root, self.split, self.cfg = root, split, cfg
        self.tokenizer, self.train = tokenizer, train
        self.augment = train if augment is None else augment
        self.targets = targets
        self.skip_bad_images, self.seed, self.epoch, self.skipped = skip_bad_images, seed, 0, set()
        self.ann = CocoAnnotations(root, split, captions=tokenizer is not None,
                                   categories=categories)
        self.tasks = tuple(t for t in TASKS if t in self.ann.tasks and t in cfg.tasks)
        self.categories = self.ann.categories
        self.coco_files = {t: path for kind, path in self.ann.files.items() for t in FILES[kind]}
        text_pieces = tokenizer.vocab_size if tokenizer else 0
        self.vocab = Vocab(len(self.categories), cfg.num_bins, text_pieces, person=self.ann.person)

    def __len__(self):
        return len(self.ann)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                image = self.load_image(i)
            except (FileNotFoundError, ValueError) as e:
                if not self.skip_bad_images:
                    raise
                if i not in self.skipped:
                    self.skipped.add(i)
                    print(f"skipping bad image ({e}); {len(self.skipped)} bad images skipped "
                          f"so far in this process")
                continue
            return self.build(i, image)
        raise RuntimeError(f"{self.root}/{self.split}: every image is missing or unreadable")

    def load_image(self, i):
        name, width, height = self.ann.image(i)
        path = os.path.join(self.root, self.split, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file missing: {path}")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")           # grayscale, RGBA and palette images become RGB
        except Exception as e:
            raise ValueError(f"cannot decode image {path}: {e}") from None
        if im.size != (width, height):
            raise ValueError(f"{path} is {im.size[0]}x{im.size[1]}, annotations say "
                             f"{width}x{height}")
        return im

    def build(self, i, image):
        """One sample: augmentation, then every task's target sequences."""
        rng = random.Random(hash((self.seed, self.epoch, i)))
        generator = torch.Generator().manual_seed(rng.getrandbits(62))
        W, H = image.size
        transform = sample_transform(W, H, rng, self.cfg, self.augment)
        image = apply_to_image(image, transform)
        w, h = image.size
        target = dict(image_id=int(self.ann.image_ids[i]), orig_size=torch.tensor([H, W]),
                      size=torch.tensor([h, w]))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)      # (3, h, w) uint8
        if not self.targets:
            return pixels, target
        vocab, cfg = self.vocab, self.cfg
        boxes, labels, segs = self.ann.objects(i)
        boxes, keep = transform_boxes(torch.from_numpy(boxes).float().view(-1, 4), transform)
        labels = torch.from_numpy(labels)[keep]
        segs = [segs[k] for k in keep.nonzero()[:, 0].tolist()]
        person_boxes, kpts = self.ann.persons(i)
        person_boxes = torch.from_numpy(person_boxes).float().view(-1, 4)
        person_boxes, kept = transform_boxes(person_boxes, transform)
        kpts = torch.from_numpy(kpts).view(-1, NUM_KEYPOINTS, 3)[kept]
        kpts = transform_keypoints(kpts, transform)
        target.update(detection_targets(boxes, labels, w, h, generator, vocab, cfg))
        segs = [segs[k] for k in target.pop("order").tolist()]       # as target["boxes"]
        target.update(segmentation_targets(target["boxes"], target["labels"], segs, H, W, transform,
                                           generator, vocab, cfg, enabled="seg" in self.tasks))
        target.update(keypoint_targets(person_boxes, kpts, w, h, generator, vocab, cfg,
                                       enabled="kpt" in self.tasks))
        captions = self.ann.captions(i) if "cap" in self.tasks else []
        target.update(caption_targets(captions, rng, self.tokenizer, vocab, cfg,
                                      sample=self.train and cfg.sample_captions))
        return pixels, target


def sample_transform(W, H, rng, cfg, augment):
    """Supplementary A. Training (augment): flip; with p = 0.5 a DETR-style random crop; then a
    random shorter side in 480..800 (step 32), longer side <= 1333 ("multiscale"); or large-scale
    jitter ("lsj", ViT). All lengths scale with cfg.image_size / 800 (the tiny preset trains at
    128).
    Evaluation: the fixed resize."""
    f = cfg.image_size / 800
    crop = (0.0, 0.0, float(W), float(H))
    if not augment:
        return affine(W, H, crop, resize_size(W, H, cfg.image_size, cfg.max_size), flip=False)
    flip = rng.random() < 0.5
    if cfg.scale_jitter == "lsj":                            # large-scale jitter on a fixed canvas
        s = rng.uniform(0.3, 2.0) * cfg.image_size / max(W, H)
        cw, ch = min(W, cfg.image_size / s), min(H, cfg.image_size / s)
        crop = (rng.uniform(0, W - cw), rng.uniform(0, H - ch), cw, ch)
        return affine(W, H, crop, (max(1, round(cw * s)), max(1, round(ch * s))), flip)
    if rng.random() < 0.5:         # DETR's crop: resize to 400/500/600, a side U(384, min(it, 600))
        s = rng.choice([400, 500, 600]) * f / min(W, H)
        cw = rng.uniform(384 * f, min(W * s, 600 * f)) / s
        ch = rng.uniform(384 * f, min(H * s, 600 * f)) / s
        crop = (rng.uniform(0, W - cw), rng.uniform(0, H - ch), cw, ch)
    short = rng.choice(range(480, 801, 32)) * f
    return affine(W, H, crop, resize_size(crop[2], crop[3], short, cfg.max_size), flip)


def detection_targets(boxes, labels, w, h, generator, vocab, cfg):
    """3.1: Q slots [x0, y0, x1, y1, class]; the objects go to random distinct slots, every
    other slot holds a noise object (random box, random class)."""
    Q, g, v = cfg.num_queries, generator, vocab
    order = torch.randperm(len(boxes), generator=g)[:Q]          # at most Q objects, shuffled
    boxes, labels = boxes[order], labels[order]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    gt = torch.cat([v.quantize(boxes / scale), (labels + v.cls)[:, None]], 1)       # (n, 5)
    corner, size = torch.rand(Q, 2, generator=g), torch.rand(Q, 2, generator=g)
    noise_box = torch.cat([corner, (corner + size).clamp(max=1)], 1)
    noise_cls = torch.randint(v.cls, v.noise, (Q, 1), generator=g)
    det_seq = torch.cat([v.quantize(noise_box), noise_cls], 1)                      # (Q, 5)
    det_seq[torch.randperm(Q, generator=g)[: len(gt)]] = gt
    return dict(boxes=boxes, labels=labels, det_seq=det_seq, det_gt=gt, order=order)


def segmentation_targets(boxes, labels, segms, H, W, transform, generator, vocab, cfg,
                         enabled=True):
    """3.1: up to S random instances; prompt [<seg>, box, class]; target = the mask inside the box
    resampled to an M x M grid (RoIAlign sampling, threshold 0.5), row-major <fg>/<bg>. Nothing
    is counted (weight 0) unless `enabled`."""
    S, M, v = cfg.max_instances, cfg.grid_size, vocab
    have = [k for k, s in enumerate(segms) if s]
    pick = [have[k] for k in torch.randperm(len(have), generator=generator)[:S].tolist()]
    prompt = torch.full((S, PROMPT_LEN), v.coord, dtype=torch.long)
    prompt[:, 0], prompt[:, 5] = v.seg, v.cls
    seq = torch.full((S, M * M), v.bg, dtype=torch.long)
    weight = torch.zeros(S, M * M)
    if pick and enabled:
        n = len(pick)
        w, h = transform["out_size"]
        prompt[:n, 1:5] = v.quantize(boxes[pick] / torch.tensor([w, h, w, h], dtype=torch.float32))
        prompt[:n, 5] = labels[pick] + v.cls
        fg = mask_in_boxes([segms[k] for k in pick], boxes[pick], H, W, transform, M)   # (n, M, M)
        seq[:n] = torch.where(fg.flatten(1), v.fg, v.bg)
        weight[:n] = 1
    return dict(seg_prompt=prompt, seg_seq=seq, seg_weight=weight)


def keypoint_targets(boxes, kpts, w, h, generator, vocab, cfg, enabled=True):
    """3.1: up to S persons, those with labelled keypoints first; prompt [<kpt>, box, person];
    17 x (x, y, <vis>|<invis>). An unlabelled keypoint gets <invis> and a random position
    inside the box whose coordinate tokens carry weight 0. Nothing is counted unless `enabled`."""
    S, K, g, v = cfg.max_instances, NUM_KEYPOINTS, generator, vocab
    prompt = torch.full((S, PROMPT_LEN), v.coord, dtype=torch.long)
    prompt[:, 0], prompt[:, 5] = v.kpt, v.cls + max(v.person, 0)
    seq = torch.full((S, K, 3), v.coord, dtype=torch.long)
    seq[:, :, 2] = v.invis
    weight = torch.zeros(S, K, 3)
    labelled = kpts[..., 2] > 0                                              # (P, 17)
    order = torch.argsort(-(labelled.sum(1) > 0).float() - torch.rand(len(kpts), generator=g))[:S]
    n = len(order)
    if n and enabled:
        b, k, lab = boxes[order], kpts[order], labelled[order]
        scale = torch.tensor([w, h], dtype=torch.float32)
        prompt[:n, 1:5] = v.quantize(b / scale.repeat(2))
        prompt[:n, 5] = v.cls + v.person
        inside_box = torch.rand(n, K, 2, generator=g) * (b[:, None, 2:] - b[:, None, :2])
        xy = torch.where(lab[..., None], k[..., :2], b[:, None, :2] + inside_box)
        seq[:n, :, :2] = v.quantize(xy / scale)
        seq[:n, :, 2] = torch.where(lab, v.vis, v.invis)
        weight[:n, :, 2] = 1
        weight[:n, :, :2] = lab[..., None].float()
        weight[:n] *= lab.any(1)[:, None, None]                  # no keypoint labelled: weight 0
    return dict(kpt_prompt=prompt, kpt_seq=seq.flatten(1), kpt_weight=weight.flatten(1))


def caption_targets(captions, rng, tokenizer, vocab, cfg, sample):
    """3.1: up to R captions (the first R, as the authors; drawn at random when `sample`),
    lower-cased SentencePiece pieces + eos, padded to L (pad = 0)."""
    R, L = cfg.max_captions, cfg.caption_len
    seq = torch.full((R, L), vocab.text, dtype=torch.long)
    weight = torch.zeros(R, L)
    if captions:
        captions = rng.sample(captions, min(R, len(captions))) if sample else captions[:R]
        seq[: len(captions)] = tokenizer.encode(captions, L) + vocab.text
        weight[: len(captions)] = 1
    return dict(cap_seq=seq, cap_weight=weight)


# -----------------------------------------------------------------------------
# Geometry. Every augmentation here is an axis-aligned affine map x' = a x + b: a crop, a resize
# and maybe a flip. Boxes and keypoints are mapped directly; masks are never resampled whole:
# the mask target is sampled from the ORIGINAL mask inside the box mapped back.

def resize_size(w, h, short, max_size):
    """(w, h) scaled so the shorter side is `short` and the longer at most `max_size`."""
    s = min(short / min(w, h), max_size / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def affine(W, H, crop, out_size, flip):
    """The map from original pixels to augmented ones: crop (x, y, w, h), resize to out_size,
    flip."""
    x, y, cw, ch = crop
    sx, sy = out_size[0] / cw, out_size[1] / ch
    ax, bx = (-sx, out_size[0] + x * sx) if flip else (sx, -x * sx)
    return dict(crop=crop, out_size=out_size, flip=flip, a=(ax, sy), b=(bx, -y * sy))


def apply_to_image(image, transform):
    x, y, cw, ch = transform["crop"]
    image = image.resize(transform["out_size"], Image.BILINEAR, box=(x, y, x + cw, y + ch))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if transform["flip"] else image


def transform_boxes(boxes, transform):
    """(n, 4) xyxy original -> augmented, clipped; returns (boxes, kept mask) without empty ones."""
    (ax, ay), (bx, by) = transform["a"], transform["b"]
    x = boxes[:, 0::2] * ax + bx
    y = boxes[:, 1::2] * ay + by
    w, h = transform["out_size"]
    x, y = x.sort(1).values.clamp(0, w), y.sort(1).values.clamp(0, h)
    out = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep


def transform_keypoints(kpts, transform):
    """(P, 17, 3) -> augmented; keypoints that leave the image become unlabelled (v = 0);
    a flip swaps left and right. COCO keypoints are pixel indices, whose centres lie at +0.5
    (detectron2's convention): index -> continuous (+0.5) -> affine map -> index (-0.5), so that
    a flip maps x to w - 1 - x."""
    (ax, ay), (bx, by) = transform["a"], transform["b"]
    w, h = transform["out_size"]
    x = kpts[..., 0] * ax + (bx + 0.5 * ax - 0.5)
    y = kpts[..., 1] * ay + (by + 0.5 * ay - 0.5)
    inside = (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    v = torch.where(inside, kpts[..., 2], torch.zeros_like(kpts[..., 2]))
    out = torch.stack([x.clamp(0, w), y.clamp(0, h), v], -1)
    return out[:, FLIP] if transform["flip"] else out


def mask_in_boxes(segms, boxes, H, W, transform, M):
    """Instance masks resampled to M x M inside their augmented boxes (n, 4): the boxes are mapped
    back to original pixels and RoIAlign samples the original-resolution mask there (a flip
    mirrors the grid). Only each box's region of the mask is rasterized."""
    (ax, ay), (bx, by) = transform["a"], transform["b"]
    x = (boxes[:, 0::2] - bx) / ax
    y = (boxes[:, 1::2] - by) / ay
    orig = torch.stack([x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], 1)
    out = []
    for segm, (x0, y0, x1, y1) in zip(segms, orig.tolist()):
        mask = torch.from_numpy(decode_segmentation(segm, H, W))
        c0, r0 = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        # the box's region
        patch = mask[r0: int(math.ceil(y1)) + 1, c0: int(math.ceil(x1)) + 1].float()
        roi = torch.tensor([[0, x0 - c0, y0 - r0, x1 - c0, y1 - r0]], dtype=torch.float32)
        out.append(roi_align(patch[None, None], roi, M, 1.0, 2, aligned=True)[0, 0] >= 0.5)
    fg = torch.stack(out) if out else torch.zeros(0, M, M, dtype=torch.bool)
    return fg.flip(-1) if transform["flip"] else fg


def decode_segmentation(segm, H, W):
    """COCO polygons / RLE -> (H, W) uint8 mask."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, H, W))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, H, W)
    else:
        rle = segm
    return mask_utils.decode(rle)


# -----------------------------------------------------------------------------
# Batching

def collate(samples, multiple=32):
    """Pad the uint8 images to a `multiple` (of the stride 32; padding True at padding), stack the
    targets, and trim the segmentation/keypoint rows that are padding in every image of the
    batch."""
    images, targets = zip(*samples)
    H = -(-max(im.shape[1] for im in images) // multiple) * multiple
    W = -(-max(im.shape[2] for im in images) // multiple) * multiple
    batch = dict(images=torch.zeros(len(images), 3, H, W, dtype=images[0].dtype),
                 padding=torch.ones(len(images), H, W, dtype=torch.bool))
    for k, im in enumerate(images):
        batch["images"][k, :, : im.shape[1], : im.shape[2]] = im
        batch["padding"][k, : im.shape[1], : im.shape[2]] = False
    for key in targets[0]:
        values = [t[key] for t in targets]
        if key in ("boxes", "labels", "det_gt"):            # one tensor per image, of its length
            batch[key] = values
        else:
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
    for task in ("seg", "kpt"):
        if f"{task}_weight" not in batch:
            continue
        rows = int(batch[f"{task}_weight"].flatten(2).any(-1).sum(1).max())
        for key in (f"{task}_prompt", f"{task}_seq", f"{task}_weight"):
            batch[key] = batch[key][:, : max(rows, 1)]
    return batch


def open_photo(path):
    """An image of one's own as RGB, upright: turned as its EXIF orientation says (a phone
    stores a portrait photo sideways with such a tag). COCO's images are read as stored."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:
        raise SystemExit(f"cannot read image {path}: {e}") from None


def inference_image(im, cfg):
    """A PIL image resized as at test time -> (image (3, h, w) uint8, orig_size (H, W),
    size (h, w))."""
    w, h = resize_size(*im.size, cfg.image_size, cfg.max_size)
    image = torch.from_numpy(np.array(im.resize((w, h), Image.BILINEAR))).permute(2, 0, 1)
    return image, torch.tensor([im.height, im.width]), torch.tensor([h, w])


def check_root(root, split):
    """A clear message when the COCO root is not there."""
    if not os.path.isdir(os.path.join(root, "annotations")):
        raise SystemExit(f"no COCO data at '{root}': expected {root}/{split}/ and "
                         f"{root}/annotations/{{instances,person_keypoints,captions}}_{split}"
                         f".json. "
                         f"Download COCO 2017 (train2017, val2017, annotations_trainval2017 from "
                         f"cocodataset.org) there or set $COCO_ROOT; or run the synthetic demo: "
                         f"python train.py --demo")


# -----------------------------------------------------------------------------
# 4.1 Caption tokenizer: a SentencePiece model trained on the split's captions

def train_caption_tokenizer(captions_json_path, out_prefix, vocab_size):
    """Train SentencePiece (BPE) on the lower-cased captions; pad=0, eos=1, unk=2, no bos.
    Deterministic: one thread, no sampling. Returns the model bytes, also written to
    out_prefix.model. (BPE, not the unigram model of T5's vocabulary: on the synthetic captions'
    33 words, sentencepiece 0.2.3's unigram trainer stops at 51 nearly single-letter pieces, 18
    per caption, 31% of the captions cut at 20 tokens; BPE learns the words: 10 pieces per
    caption, none cut.)"""
    captions = []

    def add_caption(a):
        captions.append(str(a["caption"]).lower())
    read_coco_json(captions_json_path, "captions", add_caption)
    if not captions:
        raise ValueError(f"{captions_json_path}: no captions to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, character_coverage=1.0, shuffle_input_sentence=False, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".model.tmp", "wb") as f:      # a stopped run leaves no half file
        f.write(model.getvalue())
    os.replace(out_prefix + ".model.tmp", out_prefix + ".model")
    return model.getvalue()

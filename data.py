"""COCO multi-task data for MAD: images in, every task's token sequences out.

Paper 3.1 (task tokenization) and 3.4 (task-mixed sampling): each image comes with the targets of
all four tasks that its split has (instances -> detection + segmentation, person_keypoints ->
keypoints, captions -> captioning), built after augmentation as tokens of mad.Vocab:
  reading COCO (three annotation files, checked and merged per image, held as arrays)  ->
  augmentation (flip, multi-scale, crop, LSJ)  ->  the task sequences  ->  collate (pad to a multiple
  of 32 with a pixel mask). Images stay uint8 up to the model, which normalizes them.
Also: training the SentencePiece caption model, and the synthetic COCO-format set that makes
the whole pipeline run with no download:

    python data.py synth data/synthetic --train 2000 --val 200 [--size 128] [--seed 0]
"""
import argparse
import array
import io
import json
import math
import os
import random
import shutil
import socket
import time

import numpy as np
import pycocotools.mask as mask_utils
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw
from torchvision.ops import roi_align

from mad import TASKS, Vocab

KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
             "left_knee", "right_knee", "left_ankle", "right_ankle"]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]   # COCO, 1-based
FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]   # keypoint index after a horizontal flip
FILES = {"instances": ("det", "seg"), "person_keypoints": ("kpt",), "captions": ("cap",)}
FIELDS = {"instances": ("image_id", "category_id", "bbox"), "person_keypoints": ("image_id", "category_id", "bbox"),
          "captions": ("image_id", "caption")}


# -----------------------------------------------------------------------------
# Reading COCO: the three annotation files of a split, checked and merged per image. COCO
# train2017 has 860k instance annotations: they are held as numpy arrays with offsets (no Python
# object per annotation), so that the data-loader workers, forked from this process, share them
# without ever writing their pages.

def read_coco_json(path, kind, on_annotation):
    """Parse one COCO annotation file, handing each annotation dict to on_annotation as soon as it
    is read (it is not kept). Returns the file's images as (id, file_name, width, height) and its
    categories. Errors name the file and what is wrong with it."""
    def hook(d):
        if "image_id" in d:                                        # an annotation
            missing = [k for k in FIELDS[kind] if k not in d]
            if missing:
                raise ValueError(f"{path}: annotation {d.get('id', '?')} has no field '{missing[0]}'")
            on_annotation(d)
            return None
        if "file_name" in d and "id" in d:                          # an image
            return d["id"], d["file_name"], d.get("width"), d.get("height")
        return d
    try:
        with open(path) as f:
            doc = json.load(f, object_hook=hook)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    need = ("images", "annotations") + (("categories",) if kind != "captions" else ())
    missing = [k for k in need if not isinstance(doc, dict) or not isinstance(doc.get(k), list)]
    if missing:
        raise ValueError(f"{path}: not a COCO {kind} file: no list '{missing[0]}'")
    bad = [im for im in doc["images"] if not isinstance(im, tuple) or not all(isinstance(x, int) for x in (im[0], im[2], im[3]))]
    if bad:
        raise ValueError(f"{path}: image entry {bad[0]!r} lacks an integer id, width or height, or its file_name")
    return doc["images"], doc.get("categories", [])


class Columns:
    """Growing columns of numbers (array.array: no Python object per value), then numpy arrays."""

    def __init__(self, **types):
        self.cols = {k: array.array(t) for k, t in types.items()}

    def __getattr__(self, name):
        return self.__dict__["cols"][name]

    def numpy(self):
        return {k: np.frombuffer(c, dtype=c.typecode) for k, c in self.cols.items()}


class CocoAnnotations:
    """The annotations of a split: root/annotations/{instances,person_keypoints,captions}_{split}.json,
    any of which may be missing (its tasks are then off; one printed line). Non-crowd objects with a
    box inside the image, persons with a labelled keypoint, and captions, per image; crowd, empty and
    out-of-image boxes are counted in `dropped`. Categories are sorted by COCO id (contiguous index
    i <-> categories[i]['id']); a checkpoint's categories must be the dataset's own."""

    def __init__(self, root, split, captions=True, categories=None):
        self.root, self.split, self.files = root, split, {}
        obj = Columns(ann="q", image="q", cat="q", crowd="b", box="d", polys="i", poly_len="i", coords="d", rle="i")
        per = Columns(ann="q", image="q", cat="q", crowd="b", box="d", kpts="f")
        cap = Columns(ann="q", image="q", start="q")
        text, rles, images, cats = bytearray(), [], {}, {}

        def add_object(a):
            add_box(obj, a)
            seg = a.get("segmentation")
            polygons = seg if isinstance(seg, list) else []
            obj.polys.append(len(polygons))
            for p in polygons:
                obj.coords.extend(p)
                obj.poly_len.append(len(p))
            obj.rle.append(len(rles) if isinstance(seg, dict) else -1)
            if isinstance(seg, dict):
                rles.append(seg)

        def add_person(a):
            add_box(per, a)
            kp = a.get("keypoints", [0] * 51)
            if len(kp) != 51:
                raise ValueError(f"{path}: annotation {a.get('id', '?')} has {len(kp)} keypoint values, expected 17 x 3")
            per.kpts.extend(kp)

        def add_caption(a):
            cap.ann.append(a.get("id", -1))
            cap.image.append(a["image_id"])
            cap.start.append(len(text))
            text.extend(str(a["caption"]).encode())

        add = dict(instances=add_object, person_keypoints=add_person, captions=add_caption)
        for kind, tasks in FILES.items():
            path = os.path.join(root, "annotations", f"{kind}_{split}.json")
            if not os.path.exists(path):
                print(f"{path} not found: {'/'.join(tasks)} disabled for {split}")
                continue
            if kind == "captions" and not captions:
                print(f"no caption tokenizer: cap disabled for {split}")
                continue
            ims, file_cats = read_coco_json(path, kind, add[kind])
            for im in ims:
                images.setdefault(im[0], im)
            cats.setdefault("instances" if kind == "instances" else kind, file_cats)
            self.files[kind] = path
        if not self.files:
            raise FileNotFoundError(f"no annotation files for split '{split}' under {root}/annotations")
        self.categories = self.read_categories(cats, categories)
        self.person = next((i for i, c in enumerate(self.categories) if c["name"] == "person"), -1)

        order = sorted(images)                                    # the images, by id
        self.image_ids = np.array(order, dtype=np.int64)
        self.width = np.array([images[i][2] for i in order], dtype=np.int64)
        self.height = np.array([images[i][3] for i in order], dtype=np.int64)
        self.file_names = np.array([images[i][1].encode() for i in order], dtype=bytes)
        del images
        self.dropped = 0
        o, cols = self.merge("instances", obj.numpy()), obj.numpy()
        self.obj_start, self.obj_box, self.obj_label = o["start"], o["box"], o["label"]
        first = np.concatenate([[0], np.cumsum(cols["polys"])])
        self.obj_poly = np.stack([first[:-1], first[1:]], 1)[o["keep"]]          # (n, 2): its polygons' range
        self.poly_start = np.concatenate([[0], np.cumsum(cols["poly_len"])])      # polygon k: coords[poly_start[k]:..]
        self.coords, self.obj_rle, self.rles = cols["coords"], cols["rle"][o["keep"]], rles
        p = self.merge("person_keypoints", per.numpy(), keypoints=True)
        self.person_start, self.person_box = p["start"], p["box"]
        self.person_kpts = per.numpy()["kpts"].reshape(-1, 17, 3)[p["keep"]]
        if self.dropped:
            print(f"{split}: {self.dropped} crowd, empty or out-of-image boxes dropped")
        c = cap.numpy()
        rows = self.rows(c["image"], c["ann"], "captions")
        order = np.argsort(rows, kind="stable")
        ends = np.append(c["start"][1:], len(text))[: len(c["start"])].astype(np.int64)   # each caption's end
        self.cap_start = np.searchsorted(rows[order], np.arange(len(self.image_ids) + 1))
        self.cap_span = np.stack([c["start"], ends], 1)[order]
        self.text = np.frombuffer(bytes(text), dtype=np.uint8)
        self.tasks = tuple(t for kind in self.files for t in FILES[kind])

    def read_categories(self, cats, categories):
        src = cats.get("instances") or cats.get("person_keypoints") or []
        own = sorted(({"id": c["id"], "name": c["name"]} for c in src), key=lambda c: c["id"])
        if categories is None:
            return own
        given = [{"id": c["id"], "name": c["name"]} for c in categories]
        if own and given != own:
            diff = [c for c in own if c not in given][:3] or [c for c in given if c not in own][:3]
            raise ValueError(f"{self.root} ({self.split}) has categories that differ from the checkpoint's "
                             f"({len(own)} vs {len(given)}; e.g. {diff}): this model cannot be evaluated on it")
        return given

    def rows(self, image_ids, ann_ids, kind):
        """The image row of each annotation; an annotation of an image not in 'images' is an error."""
        rows = np.searchsorted(self.image_ids, image_ids)
        bad = (rows >= len(self.image_ids)) | (self.image_ids[np.minimum(rows, len(self.image_ids) - 1)] != image_ids)
        if bad.any():
            k = int(bad.argmax())
            raise ValueError(f"{self.files[kind]}: annotation {ann_ids[k]} refers to image_id {image_ids[k]}, "
                             f"which is not in 'images'")
        return rows

    def merge(self, kind, cols, keypoints=False):
        """Boxes clipped to their image, the annotations kept (non-crowd, a box left; persons: a labelled
        keypoint), grouped by image in file order: start (images + 1,) offsets, box (n, 4), label, keep."""
        rows = self.rows(cols["image"], cols["ann"], kind)
        ids = np.array([c["id"] for c in self.categories], dtype=np.int64)       # sorted: index i <-> ids[i]
        label = np.searchsorted(ids, cols["cat"])
        unknown = (label >= len(ids)) | (ids[np.minimum(label, len(ids) - 1)] != cols["cat"]) if len(ids) else cols["cat"] == cols["cat"]
        if unknown.any():
            k = int(unknown.argmax())
            raise ValueError(f"{self.files[kind]}: annotation {cols['ann'][k]} has category_id {cols['cat'][k]}, "
                             f"which is not in 'categories'")
        x, y, w, h = cols["box"].reshape(-1, 4).T
        W, H = self.width[rows], self.height[rows]
        box = np.stack([np.maximum(x, 0), np.maximum(y, 0), np.minimum(x + w, W), np.minimum(y + h, H)], 1)
        valid = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]) & (cols["crowd"] == 0)    # NaN compares False
        self.dropped += int((~valid).sum())
        keep = valid
        if keypoints:
            keep = valid & (cols["kpts"].reshape(-1, 17, 3)[:, :, 2] > 0).any(1)
        keep = np.flatnonzero(keep)
        keep = keep[np.argsort(rows[keep], kind="stable")]
        start = np.searchsorted(rows[keep], np.arange(len(self.image_ids) + 1))
        return dict(start=start, box=box[keep], label=label[keep], keep=keep)

    def __len__(self):
        return len(self.image_ids)

    def image(self, i):
        """(file name, width, height) of image row i."""
        return self.file_names[i].decode(), int(self.width[i]), int(self.height[i])

    def objects(self, i):
        """Image row i's objects: boxes (n, 4) xyxy pixels, labels (n,), segmentations (polygons as
        float64 arrays, or an RLE dict; None without one)."""
        a, b = self.obj_start[i], self.obj_start[i + 1]
        segs = []
        for (p0, p1), r in zip(self.obj_poly[a:b], self.obj_rle[a:b]):
            polys = [self.coords[self.poly_start[k]:self.poly_start[k + 1]] for k in range(p0, p1)]
            segs.append(self.rles[r] if r >= 0 else polys or None)
        return self.obj_box[a:b], self.obj_label[a:b], segs

    def persons(self, i):
        """Image row i's persons: boxes (p, 4) and keypoints (p, 17, 3)."""
        a, b = self.person_start[i], self.person_start[i + 1]
        return self.person_box[a:b], self.person_kpts[a:b]

    def captions(self, i):
        a, b = self.cap_start[i], self.cap_start[i + 1]
        return [self.text[s:e].tobytes().decode() for s, e in self.cap_span[a:b]]

    def row(self, image_id):
        return int(np.searchsorted(self.image_ids, image_id))


def add_box(cols, a):
    cols.ann.append(a.get("id", -1))
    cols.image.append(a["image_id"])
    cols.cat.append(a["category_id"])
    cols.crowd.append(1 if a.get("iscrowd", 0) else 0)
    bbox = a["bbox"]
    cols.box.extend(bbox if len(bbox) == 4 else (math.nan,) * 4)


# -----------------------------------------------------------------------------
# 3.1 / 3.4 The dataset: every image with the targets of all the tasks it has (task-mixed sampling)

class CocoMultiTask(torch.utils.data.Dataset):
    """COCO-layout dataset returning (image (3, h, w) uint8, target dict of token sequences).

    root/{split}/*.jpg and root/annotations/{instances,person_keypoints,captions}_{split}.json
    (CocoAnnotations). Target keys (global token ids of vocab; Q = num_queries, S = max_instances,
    M = mask_size, R = max_captions, L = caption_len):
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

    def __init__(self, root, split, cfg, tokenizer, train, categories=None, skip_bad_images=False, seed=0,
                 augment=None, targets=True):
        self.root, self.split, self.cfg, self.tokenizer, self.train = root, split, cfg, tokenizer, train
        self.augment = train if augment is None else augment
        self.targets = targets
        self.skip_bad_images, self.seed, self.epoch, self.skipped = skip_bad_images, seed, 0, set()
        self.ann = CocoAnnotations(root, split, captions=tokenizer is not None, categories=categories)
        self.tasks = tuple(t for t in TASKS if t in self.ann.tasks and t in cfg.tasks)
        self.categories = self.ann.categories
        self.coco_files = {t: path for kind, path in self.ann.files.items() for t in FILES[kind]}
        self.vocab = Vocab(len(self.categories), cfg.num_bins, tokenizer.vocab_size if tokenizer else 0,
                           person=self.ann.person)

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
                    print(f"skipping bad image ({e}); {len(self.skipped)} bad images skipped so far in this process")
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
            raise ValueError(f"{path} is {im.size[0]}x{im.size[1]}, annotations say {width}x{height}")
        return im

    def build(self, i, image):
        """One sample: augmentation, then every task's target sequences."""
        rng = random.Random(hash((self.seed, self.epoch, i)))
        g = torch.Generator().manual_seed(rng.getrandbits(62))
        W, H = image.size
        t = sample_transform(W, H, rng, self.cfg, self.augment)
        image = apply_to_image(image, t)
        w, h = image.size
        target = dict(image_id=int(self.ann.image_ids[i]), orig_size=torch.tensor([H, W]), size=torch.tensor([h, w]))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)              # (3, h, w) uint8
        if not self.targets:
            return pixels, target
        v, cfg = self.vocab, self.cfg
        boxes, labels, segs = self.ann.objects(i)
        boxes, keep = transform_boxes(torch.from_numpy(boxes).float().view(-1, 4), t)
        labels, segs = torch.from_numpy(labels)[keep], [segs[k] for k in keep.nonzero()[:, 0].tolist()]
        p_boxes, kpts = self.ann.persons(i)
        p_boxes, p_keep = transform_boxes(torch.from_numpy(p_boxes).float().view(-1, 4), t)
        kpts = transform_keypoints(torch.from_numpy(kpts).view(-1, 17, 3)[p_keep], t)
        target.update(detection_targets(boxes, labels, w, h, g, v, cfg))
        segs = [segs[k] for k in target.pop("order").tolist()]                # in the order of target["boxes"]
        target.update(segmentation_targets(target["boxes"], target["labels"], segs, H, W, t, g, v, cfg, "seg" in self.tasks))
        target.update(keypoint_targets(p_boxes, kpts, w, h, g, v, cfg, "kpt" in self.tasks))
        captions = self.ann.captions(i) if "cap" in self.tasks else []
        target.update(caption_targets(captions, rng, self.tokenizer, v, cfg, sample=self.train))
        return pixels, target


def sample_transform(W, H, rng, cfg, augment):
    """Supplementary A. Training (augment): flip; with p = 0.5 a DETR-style random crop; then a random
    shorter side in 480..800 (step 32), longer side <= 1333 ("multiscale"); or large-scale jitter
    ("lsj", ViT). All lengths scale with cfg.image_size / 800 (the tiny preset trains at 128).
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
    if rng.random() < 0.5:                                    # resize to 400/500/600, crop 384..600
        s = rng.choice([400, 500, 600]) * f / min(W, H)
        cw = min(W, rng.uniform(384 * f, 600 * f) / s)
        ch = min(H, rng.uniform(384 * f, 600 * f) / s)
        crop = (rng.uniform(0, W - cw), rng.uniform(0, H - ch), cw, ch)
    short = rng.choice(range(480, 801, 32)) * f
    return affine(W, H, crop, resize_size(crop[2], crop[3], short, cfg.max_size), flip)


def detection_targets(boxes, labels, w, h, g, v, cfg):
    """3.1: Q slots [x0, y0, x1, y1, class]; the objects go to random distinct slots, every
    other slot holds a noise object (random box, random class)."""
    Q = cfg.num_queries
    order = torch.randperm(len(boxes), generator=g)[:Q]          # at most Q objects, in random order
    boxes, labels = boxes[order], labels[order]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    gt = torch.cat([v.quantize(boxes / scale), (labels + v.cls)[:, None]], 1)       # (n, 5)
    corner, size = torch.rand(Q, 2, generator=g), torch.rand(Q, 2, generator=g)
    noise_box = torch.cat([corner, (corner + size).clamp(max=1)], 1)
    noise_cls = torch.randint(v.cls, v.noise, (Q, 1), generator=g)
    det_seq = torch.cat([v.quantize(noise_box), noise_cls], 1)                      # (Q, 5)
    det_seq[torch.randperm(Q, generator=g)[: len(gt)]] = gt
    return dict(boxes=boxes, labels=labels, det_seq=det_seq, det_gt=gt, order=order)


def segmentation_targets(boxes, labels, segms, H, W, t, g, v, cfg, on=True):
    """3.1: up to S random instances; prompt [<seg>, box, class]; target = the mask inside the box
    resampled to M x M (RoIAlign sampling, threshold 0.5), row-major <fg>/<bg>."""
    S, M = cfg.max_instances, cfg.mask_size
    have = [k for k, s in enumerate(segms) if s]
    pick = [have[k] for k in torch.randperm(len(have), generator=g)[:S].tolist()]
    prompt = torch.full((S, 6), v.coord, dtype=torch.long)
    prompt[:, 0], prompt[:, 5] = v.seg, v.cls
    seq = torch.full((S, M * M), v.bg, dtype=torch.long)
    weight = torch.zeros(S, M * M)
    if pick and on:
        n = len(pick)
        w, h = t["out_size"]
        prompt[:n, 1:5] = v.quantize(boxes[pick] / torch.tensor([w, h, w, h], dtype=torch.float32))
        prompt[:n, 5] = labels[pick] + v.cls
        fg = mask_in_boxes([segms[k] for k in pick], boxes[pick], H, W, t, M)       # (n, M, M)
        seq[:n] = torch.where(fg.flatten(1), v.fg, v.bg)
        weight[:n] = 1
    return dict(seg_prompt=prompt, seg_seq=seq, seg_weight=weight)


def keypoint_targets(boxes, kpts, w, h, g, v, cfg, on=True):
    """3.1: up to S persons, those with labelled keypoints first; prompt [<kpt>, box, person];
    17 x (x, y, <vis>|<invis>). An unlabelled keypoint gets <invis> and a random position
    inside the box whose coordinate tokens carry weight 0."""
    S = cfg.max_instances
    prompt = torch.full((S, 6), v.coord, dtype=torch.long)
    prompt[:, 0], prompt[:, 5] = v.kpt, v.cls + max(v.person, 0)
    seq = torch.full((S, 17, 3), v.coord, dtype=torch.long)
    seq[:, :, 2] = v.invis
    weight = torch.zeros(S, 17, 3)
    labelled = kpts[..., 2] > 0                                              # (P, 17)
    order = torch.argsort(-(labelled.sum(1) > 0).float() - torch.rand(len(kpts), generator=g))[:S]
    n = len(order)
    if n and on:
        b, k, lab = boxes[order], kpts[order], labelled[order]
        scale = torch.tensor([w, h], dtype=torch.float32)
        prompt[:n, 1:5] = v.quantize(b / scale.repeat(2))
        prompt[:n, 5] = v.cls + v.person
        random_xy = b[:, None, :2] + torch.rand(n, 17, 2, generator=g) * (b[:, None, 2:] - b[:, None, :2])
        xy = torch.where(lab[..., None], k[..., :2], random_xy)
        seq[:n, :, :2] = v.quantize(xy / scale)
        seq[:n, :, 2] = torch.where(lab, v.vis, v.invis)
        weight[:n, :, 2] = 1
        weight[:n, :, :2] = lab[..., None].float()
        weight[:n] *= lab.any(1)[:, None, None]                              # nobody labelled: weight 0
    return dict(kpt_prompt=prompt, kpt_seq=seq.flatten(1), kpt_weight=weight.flatten(1))


def caption_targets(captions, rng, tokenizer, v, cfg, sample):
    """3.1: up to R captions (sampled at random in training, the first R otherwise), lower-cased
    SentencePiece pieces + eos, padded to L (pad = 0)."""
    R, L = cfg.max_captions, cfg.caption_len
    seq = torch.full((R, L), v.text, dtype=torch.long)
    weight = torch.zeros(R, L)
    if captions:
        captions = rng.sample(captions, min(R, len(captions))) if sample else captions[:R]
        seq[: len(captions)] = tokenizer.encode(captions, L) + v.text
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
    """The map from original pixels to augmented ones: crop (x, y, w, h), resize to out_size, flip."""
    x, y, cw, ch = crop
    sx, sy = out_size[0] / cw, out_size[1] / ch
    ax, bx = (-sx, out_size[0] + x * sx) if flip else (sx, -x * sx)
    return dict(crop=crop, out_size=out_size, flip=flip, a=(ax, sy), b=(bx, -y * sy))


def apply_to_image(image, t):
    x, y, cw, ch = t["crop"]
    image = image.resize(t["out_size"], Image.BILINEAR, box=(x, y, x + cw, y + ch))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if t["flip"] else image


def transform_boxes(boxes, t):
    """(n, 4) xyxy original -> augmented, clipped; returns (boxes, kept mask) without empty ones."""
    (ax, ay), (bx, by) = t["a"], t["b"]
    x = boxes[:, 0::2] * ax + bx
    y = boxes[:, 1::2] * ay + by
    w, h = t["out_size"]
    x, y = x.sort(1).values.clamp(0, w), y.sort(1).values.clamp(0, h)
    out = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep


def transform_keypoints(kpts, t):
    """(P, 17, 3) -> augmented; keypoints that leave the image become unlabelled (v = 0);
    a flip swaps left and right."""
    (ax, ay), (bx, by) = t["a"], t["b"]
    w, h = t["out_size"]
    x, y = kpts[..., 0] * ax + bx, kpts[..., 1] * ay + by
    inside = (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    v = torch.where(inside, kpts[..., 2], torch.zeros_like(kpts[..., 2]))
    out = torch.stack([x.clamp(0, w), y.clamp(0, h), v], -1)
    return out[:, FLIP] if t["flip"] else out


def mask_in_boxes(segms, boxes, H, W, t, M):
    """Instance masks resampled to M x M inside their augmented boxes (n, 4): the boxes are mapped
    back to original pixels and RoIAlign samples the original-resolution mask there (a flip
    mirrors the grid). Only each box's region of the mask is rasterized."""
    (ax, ay), (bx, by) = t["a"], t["b"]
    x = (boxes[:, 0::2] - bx) / ax
    y = (boxes[:, 1::2] - by) / ay
    orig = torch.stack([x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], 1)
    out = []
    for segm, (x0, y0, x1, y1) in zip(segms, orig.tolist()):
        mask = torch.from_numpy(decode_segmentation(segm, H, W))
        c0, r0 = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        patch = mask[r0: int(math.ceil(y1)) + 1, c0: int(math.ceil(x1)) + 1].float()   # the box's region
        roi = torch.tensor([[0, x0 - c0, y0 - r0, x1 - c0, y1 - r0]], dtype=torch.float32)
        out.append(roi_align(patch[None, None], roi, M, 1.0, 2, aligned=True)[0, 0] >= 0.5)
    fg = torch.stack(out) if out else torch.zeros(0, M, M, dtype=torch.bool)
    return fg.flip(-1) if t["flip"] else fg


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
    """Pad the uint8 images to a multiple of 32 (the stride; pad_mask True at padding), stack the
    targets, and trim the segmentation/keypoint rows that are padding in every image of the batch."""
    images, targets = zip(*samples)
    H = -(-max(im.shape[1] for im in images) // multiple) * multiple
    W = -(-max(im.shape[2] for im in images) // multiple) * multiple
    batch = dict(images=torch.zeros(len(images), 3, H, W, dtype=images[0].dtype),
                 pad_mask=torch.ones(len(images), H, W, dtype=torch.bool))
    for k, im in enumerate(images):
        batch["images"][k, :, : im.shape[1], : im.shape[2]] = im
        batch["pad_mask"][k, : im.shape[1], : im.shape[2]] = False
    for key in targets[0]:
        values = [t[key] for t in targets]
        batch[key] = values if key in ("boxes", "labels", "det_gt") else torch.stack([torch.as_tensor(v) for v in values])
    for task in ("seg", "kpt"):
        if f"{task}_weight" not in batch:
            continue
        rows = int(batch[f"{task}_weight"].flatten(2).any(-1).sum(1).max())
        for key in (f"{task}_prompt", f"{task}_seq", f"{task}_weight"):
            batch[key] = batch[key][:, : max(rows, 1)]
    return batch


def load_inference_image(path, cfg):
    """An image of one's own, resized as at test time -> (image (3, h, w) uint8, orig_size (H, W), size (h, w))."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:
        raise SystemExit(f"cannot read image {path}: {e}") from None
    w, h = resize_size(*im.size, cfg.image_size, cfg.max_size)
    image = torch.from_numpy(np.array(im.resize((w, h), Image.BILINEAR))).permute(2, 0, 1)
    return image, torch.tensor([im.height, im.width]), torch.tensor([h, w])


def check_root(root, split):
    """A clear message when the COCO root is not there."""
    if not os.path.isdir(os.path.join(root, "annotations")):
        raise SystemExit(f"no COCO data at '{root}': expected {root}/{split}/ and {root}/annotations/"
                         f"{{instances,person_keypoints,captions}}_{split}.json. Download COCO 2017 (train2017, "
                         f"val2017, annotations_trainval2017 from cocodataset.org) there or set $COCO_ROOT; "
                         f"or run the synthetic demo: python train.py --demo")


def random_batch(cfg, vocab, B, H, W, seed=0, n_gt=3):
    """A batch shaped like collate's, with random but well-formed tokens (tests, benchmarks)."""
    Q, S, M = cfg.num_queries, cfg.max_instances, cfg.mask_size
    g = torch.Generator().manual_seed(seed)
    coords = lambda *s: torch.randint(vocab.coord, vocab.coord + vocab.num_bins + 1, s, generator=g)
    det_seq = torch.cat([coords(B, Q, 4), torch.randint(vocab.cls, vocab.noise, (B, Q, 1), generator=g)], -1)
    prompt = lambda tok: torch.cat([torch.full((B, S, 1), tok), det_seq[:, :S]], -1)
    Hp, Wp = -(-H // 32) * 32, -(-W // 32) * 32
    pad = torch.ones(B, Hp, Wp, dtype=torch.bool)
    pad[:, :H, :W] = False
    return dict(
        images=torch.randint(0, 256, (B, 3, Hp, Wp), generator=g, dtype=torch.uint8), pad_mask=pad,
        det_seq=det_seq, det_gt=[det_seq[b, :n_gt].clone() for b in range(B)],
        seg_prompt=prompt(vocab.seg), seg_seq=torch.randint(vocab.fg, vocab.bg + 1, (B, S, M * M), generator=g),
        seg_weight=torch.ones(B, S, M * M),
        kpt_prompt=prompt(vocab.kpt), kpt_seq=coords(B, S, 51), kpt_weight=torch.ones(B, S, 51),
        cap_seq=torch.randint(vocab.text, vocab.size, (B, cfg.max_captions, cfg.caption_len), generator=g),
        cap_weight=torch.ones(B, cfg.max_captions, cfg.caption_len),
        size=torch.tensor([[H, W]] * B), orig_size=torch.tensor([[2 * H, 3 * W]] * B),
        image_id=torch.arange(B))


# -----------------------------------------------------------------------------
# 4.1 Caption tokenizer: a SentencePiece model trained on the split's captions

def train_caption_tokenizer(captions_json_path, out_prefix, vocab_size):
    """Train SentencePiece (BPE) on the lower-cased captions; pad=0, eos=1, unk=2, no bos.
    Deterministic: one thread, no sampling. Returns the model bytes, also written to out_prefix.model.
    (BPE, not the unigram model of T5's vocabulary: on the synthetic captions' 33 words, sentencepiece
    0.2.3's unigram trainer stops at 51 nearly single-letter pieces, 18 per caption, 31% of the
    captions cut at 20 tokens; BPE learns the words: 10 pieces per caption, none cut.)"""
    captions = []
    read_coco_json(captions_json_path, "captions", lambda a: captions.append(str(a["caption"]).lower()))
    if not captions:
        raise ValueError(f"{captions_json_path}: no captions to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
        character_coverage=1.0, shuffle_input_sentence=False, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    return model.getvalue()


# -----------------------------------------------------------------------------
# The synthetic COCO set: coloured shapes and stick-figure persons with keypoints, polygon masks
# and template captions, in the standard COCO layout

def ensure_synthetic_coco(root, num_train, num_val):
    """The synthetic set at root, generated unless it is there. Written to a temporary folder beside
    root and renamed, so that processes (or nodes sharing a filesystem) that generate it at once
    never see half a set: the first rename wins, the others discard their copy."""
    if os.path.exists(os.path.join(root, "annotations", "captions_val2017.json")):
        return
    print(f"generating the synthetic COCO set under {root} ...", flush=True)
    tmp = f"{root}.tmp-{socket.gethostname()}-{os.getpid()}"
    make_synthetic_coco(tmp, num_train, num_val)
    try:
        os.rename(tmp, root)
    except OSError:                      # another process was first
        shutil.rmtree(tmp, ignore_errors=True)

SHAPES = {3: "circle", 5: "square", 8: "triangle", 11: "diamond"}       # sparse ids, like COCO's
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190), "orange": (240, 130, 30)}
NUMBERS = ["no", "one", "two", "three", "four"]


def shape_polygon(name, x0, y0, s):
    """Vertices of a shape filling the square box (x0, y0, s)."""
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if name == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    if name == "square":
        return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if name == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]               # diamond


def stick_figure(x0, y0, h, rng):
    """17 COCO keypoints of a standing person of height h, and polygons for its head and limbs."""
    w = 0.5 * h
    arm, leg = rng.uniform(-0.15, 0.25), rng.uniform(0.0, 0.12)           # pose: arm raise, leg spread
    unit = [(0.5, 0.1), (0.55, 0.08), (0.45, 0.08), (0.6, 0.1), (0.4, 0.1), (0.75, 0.26), (0.25, 0.26),
            (0.85, 0.42 - arm), (0.15, 0.42 - arm), (0.92, 0.58 - 2 * arm), (0.08, 0.58 - 2 * arm),
            (0.65, 0.56), (0.35, 0.56), (0.68 + leg, 0.77), (0.32 - leg, 0.77), (0.7 + 2 * leg, 0.96),
            (0.3 - 2 * leg, 0.96)]
    kp = [(x0 + u * w, y0 + v * h) for u, v in unit]
    t = 0.035 * h                                                         # half the limb thickness
    polys = [[(kp[0][0] + 0.1 * h * math.cos(a), kp[0][1] + 0.1 * h * math.sin(a))
              for a in np.linspace(0, 2 * math.pi, 16, endpoint=False)]]   # head
    trunk = [(5, 6), (6, 12), (12, 11), (11, 5)]
    polys.append([kp[a] for a, _ in trunk])
    for a, b in [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]:
        (xa, ya), (xb, yb) = kp[a], kp[b]
        n = math.hypot(xb - xa, yb - ya) + 1e-6
        dx, dy = -(yb - ya) / n * t, (xb - xa) / n * t
        polys.append([(xa + dx, ya + dy), (xb + dx, yb + dy), (xb - dx, yb - dy), (xa - dx, ya - dy)])
    return kp, polys


def describe(objects, rng):
    """1-5 template captions of the scene, a deterministic function of what is drawn (the
    variants differ in wording), so a small model can learn them."""
    objects = sorted(objects, key=lambda o: o["x"])
    phrase = lambda o: "a person" if o["name"] == "person" else f"a {o['colour']} {o['name']}"
    names = [phrase(o) for o in objects]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    n_people = sum(o["name"] == "person" for o in objects)
    n_shapes = len(objects) - n_people
    counts = f"{NUMBERS[n_shapes]} shape{'s' * (n_shapes != 1)} and {NUMBERS[n_people]} " \
             f"{'person' if n_people == 1 else 'people'}"
    variants = [listing, f"a picture of {listing}", f"{counts} on a grey background",
                f"{names[0]} to the left of {names[-1]}" if len(names) > 1 else f"{names[0]} alone",
                f"there is {listing}"]
    return rng.sample(variants, rng.randint(1, 5))


def draw_scene(rng, W, H):
    """One image and its objects: 1-4 shapes and persons, some of them overlapping."""
    background = tuple(int(c) for c in np.array([200, 200, 200]) + rng.randint(-25, 25))
    image = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(image)
    objects, boxes = [], []
    for _ in range(rng.randint(1, 4)):
        is_person = rng.random() < 0.35
        for _try in range(10):                                             # little overlap, not none
            if is_person:                                                  # a standing figure, h x h/2
                h = rng.uniform(0.45, 0.8) * H
                x0, y0 = rng.uniform(0, W - 0.5 * h), rng.uniform(0, H - h)
                box = (x0, y0, x0 + 0.5 * h, y0 + h)
            else:
                s = rng.uniform(0.2, 0.45) * min(W, H)
                x0, y0 = rng.uniform(0, W - s), rng.uniform(0, H - s)
                box = (x0, y0, x0 + s, y0 + s)
            if all(box_iou(box, b) < 0.2 for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        if is_person:
            kp, polys = stick_figure(box[0], box[1], box[3] - box[1], rng)
            colour = tuple(rng.randint(20, 70) for _ in range(3))
            for p in polys:
                draw.polygon(p, fill=colour)
            vis = [0 if rng.random() < 0.1 else (1 if rng.random() < 0.1 else 2) for _ in kp]
            keypoints = [c for (x, y), v in zip(kp, vis) for c in ((x, y, v) if v else (0, 0, 0))]
            objects.append(dict(name="person", category_id=1, polys=polys, keypoints=keypoints, x=box[0]))
        else:
            cid = rng.choice(list(SHAPES))
            colour = rng.choice(list(COLOURS))
            poly = shape_polygon(SHAPES[cid], box[0], box[1], box[2] - box[0])
            draw.polygon(poly, fill=COLOURS[colour])
            objects.append(dict(name=SHAPES[cid], category_id=cid, colour=colour, polys=[poly], x=box[0]))
    return image, objects


def box_iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_synthetic_coco(root, num_train, num_val, image_size=128, seed=0, aspect=1.0):
    """Write the synthetic set under root in the standard COCO layout (deterministic for a seed)."""
    H, W = image_size, round(image_size * aspect)
    categories = [dict(id=1, name="person", supercategory="person", keypoints=KEYPOINTS, skeleton=SKELETON)]
    categories += [dict(id=i, name=n, supercategory="shape") for i, n in SHAPES.items()]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    ann_id = 1
    for split, count, split_seed in (("train2017", num_train, seed), ("val2017", num_val, seed + 1_000_003)):
        rng = random.Random(split_seed)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, instances, keypoints, captions = [], [], [], []
        for k in range(count):
            image_id = k + 1
            image, objects = draw_scene(rng, W, H)
            name = f"{image_id:012d}.jpg"
            image.save(os.path.join(root, split, name), quality=90)
            images.append(dict(id=image_id, file_name=name, width=W, height=H))
            for o in objects:
                rle = mask_utils.merge(mask_utils.frPyObjects([sum(map(list, p), []) for p in o["polys"]], H, W))
                ann = dict(id=ann_id, image_id=image_id, category_id=o["category_id"], iscrowd=0,
                           segmentation=[[round(c, 2) for p in poly for c in p] for poly in o["polys"]],
                           area=float(mask_utils.area(rle)), bbox=[round(c, 2) for c in mask_utils.toBbox(rle).tolist()])
                instances.append(ann)
                if o["name"] == "person":
                    keypoints.append(dict(ann, keypoints=[round(c, 2) for c in o["keypoints"]],
                                          num_keypoints=sum(v > 0 for v in o["keypoints"][2::3])))
                ann_id += 1
            for c in describe(objects, rng) if objects else ["an empty grey background"]:
                captions.append(dict(id=ann_id, image_id=image_id, caption=c))
                ann_id += 1
        common = dict(info=dict(description="MAD synthetic COCO"), licenses=[], images=images)
        for kind, anns, cats in (("instances", instances, categories), ("person_keypoints", keypoints, categories[:1]),
                                 ("captions", captions, None)):
            d = dict(common, annotations=anns, **({"categories": cats} if cats else {}))
            with open(os.path.join(root, "annotations", f"{kind}_{split}.json"), "w") as f:
                json.dump(d, f)


def main():
    p = argparse.ArgumentParser(description="MAD data tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic COCO-format set")
    s.add_argument("root")
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--val", type=int, default=200)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t = time.time()
    make_synthetic_coco(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} + {args.val} images to {args.root} in {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()

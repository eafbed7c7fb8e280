"""Synthetic data: a COCO-format set that makes the whole pipeline run with no download, and
random batches for tests and benchmarks.

The set: coloured shapes and stick-figure persons with 17 keypoints, polygon masks and template
captions, in the standard COCO layout (train.py --demo generates it under data/synthetic):

    python synthetic.py data/synthetic --train 1600 --val 200 [--size 128] [--seed 0]
"""
import argparse
import json
import math
import os
import random
import shutil
import socket
import time

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageDraw

from data import KEYPOINTS, SKELETON
from mad import KPT_LEN


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
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 30), "purple": (150, 60, 190), "orange": (240, 130, 30)}
NUMBERS = ["no", "one", "two", "three", "four"]


def shape_polygon(name, x0, y0, s):
    """Vertices of a shape filling the square box (x0, y0, s)."""
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    if name == "circle":
        angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if name == "square":
        return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if name == "triangle":
        return [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]               # diamond


def stick_figure(x0, y0, h, rng):
    """17 COCO keypoints of a standing person of height h, and polygons for its head and limbs."""
    w = 0.5 * h
    arm, leg = rng.uniform(-0.15, 0.25), rng.uniform(0.0, 0.12)       # pose: arm raise, leg spread
    unit = [(0.5, 0.1), (0.55, 0.08), (0.45, 0.08), (0.6, 0.1), (0.4, 0.1),
            (0.75, 0.26), (0.25, 0.26),
            (0.85, 0.42 - arm), (0.15, 0.42 - arm), (0.92, 0.58 - 2 * arm), (0.08, 0.58 - 2 * arm),
            (0.65, 0.56), (0.35, 0.56),
            (0.68 + leg, 0.77), (0.32 - leg, 0.77), (0.7 + 2 * leg, 0.96), (0.3 - 2 * leg, 0.96)]
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
        polys.append([(xa + dx, ya + dy), (xb + dx, yb + dy),
                      (xb - dx, yb - dy), (xa - dx, ya - dy)])
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
        for _try in range(10):                                         # little overlap, not none
            if is_person:                                              # a standing figure, h x h/2
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
            objects.append(dict(name="person", category_id=1, polys=polys, keypoints=keypoints,
                                x=box[0]))
        else:
            cid = rng.choice(list(SHAPES))
            colour = rng.choice(list(COLOURS))
            poly = shape_polygon(SHAPES[cid], box[0], box[1], box[2] - box[0])
            draw.polygon(poly, fill=COLOURS[colour])
            objects.append(dict(name=SHAPES[cid], category_id=cid, colour=colour, polys=[poly],
                                x=box[0]))
    return image, objects


def box_iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_synthetic_coco(root, num_train, num_val, image_size=128, seed=0, aspect=1.0):
    """Write the synthetic set under root in the standard COCO layout (deterministic for a seed)."""
    H, W = image_size, round(image_size * aspect)
    categories = [dict(id=1, name="person", supercategory="person", keypoints=KEYPOINTS,
                       skeleton=SKELETON)]
    categories += [dict(id=i, name=n, supercategory="shape") for i, n in SHAPES.items()]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    ann_id = 1
    splits = (("train2017", num_train, seed), ("val2017", num_val, seed + 1_000_003))
    for split, count, split_seed in splits:
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
                flat = [sum(map(list, p), []) for p in o["polys"]]
                rle = mask_utils.merge(mask_utils.frPyObjects(flat, H, W))
                ann = dict(id=ann_id, image_id=image_id, category_id=o["category_id"], iscrowd=0,
                           segmentation=[[round(c, 2) for c in poly] for poly in flat],
                           area=float(mask_utils.area(rle)),
                           bbox=[round(c, 2) for c in mask_utils.toBbox(rle).tolist()])
                instances.append(ann)
                if o["name"] == "person":
                    keypoints.append(dict(ann, keypoints=[round(c, 2) for c in o["keypoints"]],
                                          num_keypoints=sum(v > 0 for v in o["keypoints"][2::3])))
                ann_id += 1
            for c in describe(objects, rng) if objects else ["an empty grey background"]:
                captions.append(dict(id=ann_id, image_id=image_id, caption=c))
                ann_id += 1
        common = dict(info=dict(description="MAD synthetic COCO"), licenses=[], images=images)
        files = (("instances", instances, categories),
                 ("person_keypoints", keypoints, categories[:1]), ("captions", captions, None))
        for kind, anns, cats in files:
            d = dict(common, annotations=anns, **({"categories": cats} if cats else {}))
            with open(os.path.join(root, "annotations", f"{kind}_{split}.json"), "w") as f:
                json.dump(d, f)


# Random batches

def random_batch(cfg, vocab, B, H, W, seed=0, n_gt=3):
    """A batch shaped like data.collate's, with random but well-formed tokens (tests, benchmarks):
    B images of H x W padded to a multiple of 32, n_gt objects each."""
    Q, S, M = cfg.num_queries, cfg.max_instances, cfg.grid_size
    R, L = cfg.max_captions, cfg.caption_len
    g = torch.Generator().manual_seed(seed)

    def coords(*shape):
        return torch.randint(vocab.coord, vocab.coord + vocab.num_bins + 1, shape, generator=g)

    boxes = coords(B, Q, 4)
    det_seq = torch.cat([boxes, torch.randint(vocab.cls, vocab.noise, (B, Q, 1), generator=g)], -1)

    def prompt(task_token):                                       # (B, S, PROMPT_LEN)
        return torch.cat([torch.full((B, S, 1), task_token), det_seq[:, :S]], -1)

    Hp, Wp = -(-H // 32) * 32, -(-W // 32) * 32
    padding = torch.ones(B, Hp, Wp, dtype=torch.bool)
    padding[:, :H, :W] = False
    images = torch.randint(0, 256, (B, 3, Hp, Wp), generator=g, dtype=torch.uint8)
    seg_seq = torch.randint(vocab.fg, vocab.bg + 1, (B, S, M * M), generator=g)
    return dict(
        images=images, padding=padding,
        det_seq=det_seq, det_gt=[det_seq[b, :n_gt].clone() for b in range(B)],
        seg_prompt=prompt(vocab.seg), seg_seq=seg_seq, seg_weight=torch.ones(B, S, M * M),
        kpt_prompt=prompt(vocab.kpt), kpt_seq=coords(B, S, KPT_LEN),
        kpt_weight=torch.ones(B, S, KPT_LEN),

        cap_seq=torch.randint(vocab.text, vocab.size, (B, R, L), generator=g),
        cap_weight=torch.ones(B, R, L),
        size=torch.tensor([[H, W]] * B), orig_size=torch.tensor([[2 * H, 3 * W]] * B),
        image_id=torch.arange(B))

def main():
    p = argparse.ArgumentParser(description="write the synthetic COCO-format set")
    p.add_argument("root")
    p.add_argument("--train", type=int, default=1600)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t = time.time()
    make_synthetic_coco(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} + {args.val} images to {args.root} in {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()

"""COCO-format data, apart from the method: reading a split's annotation files (checked when
read, held as arrays) for data.py, and the synthetic set that runs everything with no download.

The synthetic set: coloured shapes and stick-figure persons with 17 keypoints, polygon masks and
template captions, in the standard COCO layout (train.py --demo generates it under data/synthetic):

    python coco.py data/synthetic --train 1600 --val 200 [--size 128] [--seed 0]

Also random batches, shaped like data.collate's, for the tests and benchmarks.
"""
import argparse
import array
import json
import math
import os
import random
import shutil
import socket
import time
from functools import partial

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageDraw

from mad import KPT_LEN, NUM_KEYPOINTS

KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
             "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
             "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
            [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6],
            [5, 7]]                                                   # COCO's, 1-based
FILES = {"instances": ("det", "seg"), "person_keypoints": ("kpt",), "captions": ("cap",)}
FIELDS = {"instances": ("image_id", "category_id", "bbox"),
          "person_keypoints": ("image_id", "category_id", "bbox"),
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
                raise ValueError(f"{path}: annotation {d.get('id', '?')} has no field "
                                 f"'{missing[0]}'")
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
    bad = [im for im in doc["images"] if not isinstance(im, tuple)
           or not all(type(x) is int for x in (im[0], im[2], im[3]))
           or not isinstance(im[1], str) or not (im[2] > 0 and im[3] > 0)]
    if bad:
        raise ValueError(f"{path}: image entry {str(bad[0])[:80]} lacks an integer id, a "
                         f"positive width and height, or its file_name")
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
    """The annotations of a split: root/annotations/{instances,person_keypoints,captions}_{split}
    .json, any of which may be missing (its tasks are then off; one printed line). Non-crowd
    objects with a box inside the image, persons with a labelled keypoint, and captions, per
    image; crowd, empty and out-of-image boxes are counted in `dropped`. Categories are sorted by
    COCO id (contiguous index i <-> categories[i]['id']); a checkpoint's categories must be the
    dataset's own."""

    def __init__(self, root, split, captions=True, categories=None):
        self.root, self.split, self.files = root, split, {}
        self.bad_masks, self.bad_mask_example = 0, None     # masks dropped (polygons, RLEs)
        self.dropped = 0                    # crowd, empty, out-of-image boxes of both box files
        obj, per, cap, text, images, cats = self.read_files(captions)
        self.categories = self.read_categories(cats, categories)
        self.person = next((i for i, c in enumerate(self.categories) if c["name"] == "person"), -1)
        order = sorted(images)                                    # the images, by id
        self.image_ids = np.array(order, dtype=np.int64)
        self.width = np.array([images[i][2] for i in order], dtype=np.int64)
        self.height = np.array([images[i][3] for i in order], dtype=np.int64)
        self.file_names = np.array([images[i][1].encode() for i in order], dtype=bytes)
        self.index_objects(obj.numpy())
        self.index_persons(per)
        self.duplicate_ids = {kind: repeated(c.numpy()["ann"]) for kind, c in
                              (("instances", obj), ("person_keypoints", per)) if kind in self.files}
        if self.dropped:
            print(f"{split}: {self.dropped} crowd, empty or out-of-image boxes dropped "
                  f"(instances and person_keypoints files counted apart)")
        if self.bad_masks:
            print(f"{split}: {self.bad_masks} objects lost a mask or part of one (polygons of "
                  f"fewer than 3 points, RLEs that do not fit their image), e.g. annotation "
                  f"{self.bad_mask_example}; their boxes stay")
        self.index_captions(cap.numpy(), text)
        self.tasks = tuple(t for kind in self.files for t in FILES[kind])

    def read_files(self, captions):
        """Read the split's annotation files, checking each annotation as it comes: -> columns of
        objects, persons and captions, the caption text, the images {id: (id, file_name, width,
        height)} and each file's categories. The RLEs go to self.rles."""
        obj = Columns(ann="q", image="q", cat="q", crowd="b", box="d", polys="i", poly_len="i",
                      coords="d", rle="i")
        per = Columns(ann="q", image="q", cat="q", crowd="b", box="d", kpts="f")
        cap = Columns(ann="q", image="q", start="q")
        text, images, cats, self.rles = bytearray(), {}, {}, []

        def add_object(a, path):
            add_box(obj, a, path)
            seg = a.get("segmentation")
            polygons = [p for p in seg if usable_polygon(p, a, path)] if is_list(seg) else []
            if is_list(seg) and len(polygons) < len(seg):
                self.bad_masks += 1
                self.bad_mask_example = a.get("id", "?")
            obj.polys.append(len(polygons))
            for p in polygons:
                obj.coords.extend(p)
                obj.poly_len.append(len(p))
            obj.rle.append(len(self.rles) if isinstance(seg, dict) else -1)
            if isinstance(seg, dict):
                self.rles.append(check_rle(seg, a, path))
            elif seg is not None and not is_list(seg):
                raise field_error(path, a, "segmentation", "polygons (a list) or an RLE (a dict)")

        def add_person(a, path):
            add_box(per, a, path)
            kp = a.get("keypoints", [0] * KPT_LEN)
            if not is_list(kp) or len(kp) != KPT_LEN:
                raise field_error(path, a, "keypoints", f"{NUM_KEYPOINTS} x 3 numbers")
            add_numbers(per.kpts, kp, a, "keypoints", path)

        def add_caption(a, path):
            add_id(cap.ann, a, "id", path, missing=-1)
            add_id(cap.image, a, "image_id", path)
            if not isinstance(a["caption"], str):
                raise field_error(path, a, "caption", "a string")
            cap.start.append(len(text))
            text.extend(a["caption"].encode())

        add = dict(instances=add_object, person_keypoints=add_person, captions=add_caption)
        for kind, tasks in FILES.items():
            path = os.path.join(self.root, "annotations", f"{kind}_{self.split}.json")
            if not os.path.exists(path):
                print(f"{path} not found: {'/'.join(tasks)} disabled for {self.split}")
                continue
            if kind == "captions" and not captions:
                print(f"no caption tokenizer: cap disabled for {self.split}")
                continue
            ims, file_cats = read_coco_json(path, kind, partial(add[kind], path=path))
            for im in ims:
                images.setdefault(im[0], im)
            cats.setdefault("instances" if kind == "instances" else kind, file_cats)
            self.files[kind] = path
        if not self.files:
            raise FileNotFoundError(f"no annotation files for split '{self.split}' under "
                                    f"{self.root}/annotations")
        return obj, per, cap, text, images, cats

    def index_objects(self, cols):
        """Objects grouped by image: boxes, labels, and where each one's polygons or RLE are."""
        cols["rle"] = self.usable_rles(cols, self.rles)
        o = self.merge("instances", cols)
        self.obj_start, self.obj_box, self.obj_label = o["start"], o["box"], o["label"]
        first = np.concatenate([[0], np.cumsum(cols["polys"])])
        # object n's polygons: obj_poly[n] = (first, end); polygon k: coords[poly_start[k]:..]
        self.obj_poly = np.stack([first[:-1], first[1:]], 1)[o["keep"]]
        self.poly_start = np.concatenate([[0], np.cumsum(cols["poly_len"])])
        self.coords, self.obj_rle = cols["coords"], cols["rle"][o["keep"]]

    def index_persons(self, per):
        """Persons grouped by image: boxes and keypoints (p, 17, 3), which must be finite."""
        p = self.merge("person_keypoints", per.numpy(), keypoints=True)
        self.person_start, self.person_box = p["start"], p["box"]
        kpts = per.numpy()["kpts"].reshape(-1, NUM_KEYPOINTS, 3)
        if not np.isfinite(kpts).all():
            k = int((~np.isfinite(kpts).reshape(len(kpts), -1).all(1)).argmax())
            raise ValueError(f"{self.files['person_keypoints']}: annotation {per.ann[k]}: "
                             f"'keypoints' holds a value that is not a finite number")
        self.person_kpts = kpts[p["keep"]]

    def index_captions(self, c, text):
        """Captions grouped by image: spans of their UTF-8 bytes in one array."""
        rows = self.rows(c["image"], c["ann"], "captions")
        order = np.argsort(rows, kind="stable")
        ends = np.append(c["start"][1:], len(text))[: len(c["start"])].astype(np.int64)
        self.cap_start = np.searchsorted(rows[order], np.arange(len(self.image_ids) + 1))
        self.cap_span = np.stack([c["start"], ends], 1)[order]
        self.text = np.frombuffer(bytes(text), dtype=np.uint8)

    def usable_rles(self, cols, rles):
        """The RLE index column, -1 where an RLE does not fit its image (its size is not the
        image's, or its runs do not cover height x width pixels): dropped and counted."""
        rle = cols["rle"].copy()
        have = np.flatnonzero(rle >= 0)
        rows = self.rows(cols["image"][have], cols["ann"][have], "instances")
        for k, row in zip(have.tolist(), rows.tolist()):
            r, H, W = rles[rle[k]], int(self.height[row]), int(self.width[row])
            if list(r["size"]) != [H, W] or rle_pixels(r) != H * W:
                rle[k] = -1
                self.bad_masks += 1
                self.bad_mask_example = int(cols["ann"][k])
        return rle

    def read_categories(self, cats, categories):
        """The categories sorted by COCO id (instances', else person_keypoints'); a checkpoint's
        must equal the dataset's own."""
        src = cats.get("instances") or cats.get("person_keypoints") or []
        own = sorted(({"id": c["id"], "name": c["name"]} for c in src), key=lambda c: c["id"])
        if categories is None:
            return own
        given = [{"id": c["id"], "name": c["name"]} for c in categories]
        if own and given != own:
            diff = [c for c in own if c not in given][:3] or [c for c in given if c not in own][:3]
            raise ValueError(f"{self.root} ({self.split}) has categories that differ from the "
                             f"checkpoint's ({len(own)} vs {len(given)}; e.g. {diff}): this model "
                             f"cannot be evaluated on it")
        return given

    def rows(self, image_ids, ann_ids, kind):
        """The image row of each annotation; an annotation of an image not in 'images' is an
        error."""
        rows = np.searchsorted(self.image_ids, image_ids)
        found = self.image_ids[np.minimum(rows, len(self.image_ids) - 1)] == image_ids
        bad = (rows >= len(self.image_ids)) | ~found
        if bad.any():
            k = int(bad.argmax())
            raise ValueError(f"{self.files[kind]}: annotation {ann_ids[k]} refers to image_id "
                             f"{image_ids[k]}, which is not in 'images'")
        return rows

    def merge(self, kind, cols, keypoints=False):
        """Boxes clipped to their image, the annotations kept (non-crowd, a box left; persons: a
        labelled keypoint), grouped by image in file order: start (images + 1,) offsets, box
        (n, 4), label, keep."""
        rows = self.rows(cols["image"], cols["ann"], kind)
        ids = np.array([c["id"] for c in self.categories], dtype=np.int64)   # index i <-> ids[i]
        label = np.searchsorted(ids, cols["cat"])
        if len(ids):
            found = ids[np.minimum(label, len(ids) - 1)] == cols["cat"]
            unknown = (label >= len(ids)) | ~found
        else:
            unknown = cols["cat"] == cols["cat"]
        if unknown.any():
            k = int(unknown.argmax())
            raise ValueError(f"{self.files[kind]}: annotation {cols['ann'][k]} has category_id "
                             f"{cols['cat'][k]}, which is not in 'categories'")
        x, y, w, h = cols["box"].reshape(-1, 4).T
        W, H = self.width[rows], self.height[rows]
        box = np.stack([np.maximum(x, 0), np.maximum(y, 0),
                        np.minimum(x + w, W), np.minimum(y + h, H)], 1)
        # NaN compares False
        valid = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]) & (cols["crowd"] == 0)
        self.dropped += int((~valid).sum())
        keep = valid
        if keypoints:
            labelled = cols["kpts"].reshape(-1, NUM_KEYPOINTS, 3)[:, :, 2] > 0
            keep = valid & labelled.any(1)
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


# Checking one annotation as it is read: a value of the wrong type stops the run here, naming the
# file, the annotation and the field, never later inside a data-loader worker. Polygons of fewer
# than 3 points are dropped and counted (as detectron2 does).

def field_error(path, a, field, expected):
    value = repr(a.get(field))
    value = value if len(value) <= 60 else value[:57] + "..."
    return ValueError(f"{path}: annotation {a.get('id', '?')}: '{field}' is {value}, expected "
                      f"{expected}")


def is_list(x):
    return isinstance(x, (list, tuple))


def add_id(column, a, field, path, missing=None):
    value = a.get(field, missing)
    if type(value) is not int:
        raise field_error(path, a, field, "an integer")
    column.append(value)


def add_numbers(column, values, a, field, path):
    """Append numbers (JSON ints or floats) to an array column."""
    if any(type(v) not in (int, float) for v in values):
        raise field_error(path, a, field, "numbers")
    column.extend(values)


def add_box(cols, a, path):
    add_id(cols.ann, a, "id", path, missing=-1)
    add_id(cols.image, a, "image_id", path)
    add_id(cols.cat, a, "category_id", path)
    if a.get("iscrowd", 0) not in (0, 1):
        raise field_error(path, a, "iscrowd", "0 or 1")
    cols.crowd.append(a.get("iscrowd", 0))
    if not is_list(a["bbox"]) or len(a["bbox"]) != 4:
        raise field_error(path, a, "bbox", "[x, y, width, height]")
    add_numbers(cols.box, a["bbox"], a, "bbox", path)


def usable_polygon(p, a, path):
    """A polygon of at least 3 finite points; False drops it; wrong types are an error."""
    if not is_list(p) or any(type(v) not in (int, float) for v in p):
        raise field_error(path, a, "segmentation", "polygons: lists of numbers")
    return len(p) >= 6 and len(p) % 2 == 0 and all(math.isfinite(v) for v in p)


def check_rle(rle, a, path):
    """An RLE's form: size [height, width] and counts (a COCO string or a list of run lengths)."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (is_list(size) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise field_error(path, a, "segmentation", "an RLE with size [height, width]")
    if not (isinstance(counts, str) or (is_list(counts)
                                        and all(type(v) is int and v >= 0 for v in counts))):
        raise field_error(path, a, "segmentation", "an RLE with counts: a string or run lengths")
    return rle


def repeated(ids):
    """Ids that occur more than once (the first 5)."""
    values, counts = np.unique(ids, return_counts=True)
    return values[counts > 1][:5].tolist()


def rle_pixels(rle):
    """The number of pixels an RLE's runs cover (its counts decoded as pycocotools does): it
    must be height x width, or decoding it would write past its mask."""
    counts = rle["counts"]
    if is_list(counts):
        return sum(counts)
    runs, k, total = [], 0, 0
    s = counts.encode()
    while k < len(s):
        x, shift, more = 0, 0, True
        while more:
            if k >= len(s):
                return -1
            c = s[k] - 48
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            k, shift = k + 1, shift + 5
            if not more and c & 0x10:
                x |= -1 << shift
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return -1
        runs.append(x)
        total += x
    return total


# -----------------------------------------------------------------------------
# The synthetic set

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

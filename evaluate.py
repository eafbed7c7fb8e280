"""Evaluate a MAD checkpoint: COCO AP for boxes, masks and keypoints (pycocotools) and BLEU-4.

    python evaluate.py runs/mad/last.pt                            # val2017 of the training data
    python evaluate.py ckpt.pt --data data/coco --max-images 500 --show 8 --out runs/eval
    torchrun --nproc_per_node 2 evaluate.py ckpt.pt                # distributed, the same numbers
    python evaluate.py ckpt.pt --images photos/ --out runs/photos  # own images: PNGs + .jsonl

The checkpoint holds everything needed (config, vocabulary, SentencePiece model, categories).
Writes COCO result JSON files, metrics.json (bbox_AP, segm_AP, keypoints_AP, BLEU4, in percent,
as papers report them) and, with --show N, N pictures of the predictions.
"""
import argparse
import collections
import json
import math
import os
import re
import time

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

import coco
import data
import mad
import runtime


# -----------------------------------------------------------------------------
# BLEU-4, as the standard COCO caption scorer computes it (corpus level, 'closest' reference length)

def normalize_caption(text):
    """Lower-case, punctuation removed, split on white space. (The COCO scorer runs the PTB
    tokenizer, which also drops punctuation but splits some contractions differently.)"""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def ngram_counts(words, n):
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions, references):
    """predictions {image_id: caption}, references {image_id: [captions]} -> BLEU-4 in [0, 1].
    Clipped n-gram matches and lengths are summed over the corpus; the reference length of a
    caption is the one closest to its length (ties: the shorter); brevity penalty
    exp(1 - ref/test) when test < ref; the scorer's constants 1e-15 and 1e-9 keep zeros finite."""
    tiny, small = 1e-15, 1e-9
    test_len = ref_len = 0
    guess, correct = [0] * 4, [0] * 4
    for image_id, caption in predictions.items():
        if image_id not in references:
            raise KeyError(f"no reference captions for image {image_id}")
        hyp = normalize_caption(caption)
        refs = [normalize_caption(r) for r in references[image_id]]
        test_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            max_ref = collections.Counter()
            for r in refs:
                max_ref |= ngram_counts(r, n)
            guess[n - 1] += max(len(hyp) - n + 1, 0)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in ngram_counts(hyp, n).items())
    score = math.prod((c + tiny) / (g + small) for c, g in zip(correct, guess)) ** 0.25
    ratio = (test_len + tiny) / (ref_len + small)
    return score * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


# -----------------------------------------------------------------------------
# Predictions -> COCO results -> AP

def to_coco_results(preds, image_ids, categories):
    """model.predict outputs (one dict per image) -> COCO result lists and {image_id: caption}."""
    res = dict(bbox=[], segm=[], keypoints=[], captions={})
    cat_id = [c["id"] for c in categories]
    for p, image_id in zip(preds, image_ids):
        if "boxes" in p:
            xywh = torch.cat([p["boxes"][:, :2], p["boxes"][:, 2:] - p["boxes"][:, :2]], 1)
            for box, s, l in zip(xywh.tolist(), p["scores"].tolist(), p["labels"].tolist()):
                res["bbox"].append(dict(image_id=image_id, category_id=cat_id[l], bbox=box,
                                        score=s))
        if "masks" in p or "masks_rle" in p:
            rles = p["masks_rle"] if "masks_rle" in p else masks_to_rle(p["masks"])
            for rle, s, l in zip(rles, p["scores"].tolist(), p["labels"].tolist()):
                res["segm"].append(dict(image_id=image_id, category_id=cat_id[l],
                                        segmentation=rle, score=s))
        if "keypoints" in p:
            labels, scores = p["labels"].tolist(), p["scores"].tolist()
            for k, i in zip(p["keypoints"].tolist(), p["kpt_index"].tolist()):
                flat = [c for xyv in k for c in xyv]
                res["keypoints"].append(dict(image_id=image_id, category_id=cat_id[labels[i]],
                                             keypoints=flat, score=scores[i]))
        if "caption" in p:
            res["captions"][image_id] = p["caption"]
    return res


def to_cpu(prediction):
    """One prediction of MAD.predict (on the model's device) -> on the CPU."""
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in prediction.items()}


def masks_to_rle(masks):
    """(K, H, W) bool -> K COCO RLEs (JSON-ready: counts as str)."""
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    return [dict(size=r["size"], counts=r["counts"].decode("ascii")) for r in rles]


def rle_to_masks(rles, H, W):
    """K COCO RLEs -> (K, H, W) bool."""
    if not rles:
        return torch.zeros(0, H, W, dtype=torch.bool)
    return torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).bool()


def coco_ap(gt_path, results, iou_type, image_ids):
    """COCOeval over image_ids -> (AP, AP50, AP75) in percent (0 when there are no results)."""
    if not results:
        return 0.0, 0.0, 0.0
    gt = quiet(COCO, gt_path)
    ev = COCOeval(gt, quiet(gt.loadRes, results), iou_type)
    ev.params.imgIds = sorted(image_ids)
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    quiet(ev.summarize)
    return tuple(max(100 * float(x), 0.0) for x in ev.stats[:3])


def quiet(fn, *args):
    """Run a pycocotools call without its progress prints."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


# -----------------------------------------------------------------------------
# Distributed inference: each rank takes every world-th image, no padding duplicates; rank 0
# gathers and de-duplicates by image id, so the numbers do not depend on the number of processes.

def shard(n, rank, world):
    return list(range(rank, n, world))


@torch.inference_mode()
def run_predictions(model, dataset, tokenizer, indices, batch_size, workers, device,
                    progress=True, world=1):
    """{image_id: prediction dict} for the dataset items at `indices`, and seconds of model time.
    Masks are kept as RLE (masks_rle): dense masks of 5,000 COCO images would not fit in memory.
    With `progress`, a line with images/s and the ETA every 10 s (this rank's shard x world)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=batch_size, num_workers=workers,
                                         collate_fn=data.collate)
    preds, seconds, done, start, last = {}, 0.0, 0, time.time(), time.time()
    oracle = prompted_by_ground_truth(dataset.tasks)
    for batch in loader:
        t = time.perf_counter()
        images, padding = batch["images"].to(device), batch["padding"].to(device)
        if oracle:
            boxes = [ground_truth_boxes(dataset, i) for i in batch["image_id"].tolist()]
            out = mad.predict_from_boxes(model, images, padding, batch["orig_size"], boxes,
                                         dataset.tasks, tokenizer)
        else:
            out = model.predict(images, padding, batch["orig_size"], dataset.tasks, tokenizer)
        out = [to_cpu(p) for p in out]                                 # (waits for the device)
        seconds += time.perf_counter() - t
        for p in out:
            if "masks" in p:
                p["masks_rle"] = masks_to_rle(p.pop("masks"))
        preds.update(zip(batch["image_id"].tolist(), out))
        done += len(out)
        if progress and (time.time() - last > 10 or done == len(indices)):
            rate = done / (time.time() - start)
            print(f"evaluated {done * world}/{len(indices) * world} images, "
                  f"{rate * world:.1f} images/s, ETA {(len(indices) - done) / rate / 60:.1f} min",
                  flush=True)
            last = time.time()
    return preds, seconds


def prompted_by_ground_truth(tasks):
    """A model without detection has segmentation or keypoints prompted by ground-truth boxes."""
    return "det" not in tasks and bool({"seg", "kpt"} & set(tasks))


def ground_truth_boxes(dataset, image_id):
    """(n, 5) [x0, y0, x1, y1 original pixels, class] of an image: the prompts of a model trained
    without detection (an oracle: its segmentation / keypoint AP assumes perfect boxes)."""
    boxes, labels, _ = dataset.ann.objects(dataset.ann.row(image_id))
    labels = torch.from_numpy(labels)[:, None].float()
    return torch.cat([torch.from_numpy(boxes).float(), labels], 1)


def evaluate(model, dataset, tokenizer, out_dir, batch_size=1, workers=0, max_images=0, show=0,
             device="cpu", score_thresh=0.3):
    """Predict over the split (sharded over DDP ranks), score on rank 0; returns the metrics dict
    (None on other ranks). Writes {bbox,segm,keypoints,captions}_results.json and metrics.json."""
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    n = min(len(dataset), max_images) if max_images else len(dataset)
    was_training = model.training
    model.eval()
    local, seconds = run_predictions(model, dataset, tokenizer, shard(n, rank, world), batch_size,
                                     workers, device, progress=rank == 0, world=world)
    model.train(was_training)
    parts = runtime.gather((local, seconds))                   # every rank's {image_id: prediction}
    if rank != 0:
        return None
    preds = {i: p for part, _ in parts for i, p in part.items()}
    times = [s for _, s in parts]
    # the split's first n images, less those --skip-bad-images left out
    image_ids = [i for i in dataset.ann.image_ids[:n].tolist() if i in preds]
    res = to_coco_results([preds[i] for i in image_ids], image_ids, dataset.categories)
    os.makedirs(out_dir, exist_ok=True)
    metrics = dict(num_images=len(image_ids),
                   ms_per_image=1e3 * sum(times) / max(len(image_ids), 1))
    if len(image_ids) < n:
        metrics["skipped_images"] = n - len(image_ids)
        print(f"{n - len(image_ids)} unreadable images left out: scored on {len(image_ids)}")
    if prompted_by_ground_truth(dataset.tasks):
        metrics["prompts"] = "ground-truth boxes (oracle: no detection task)"
        print("no detection task: segmentation / keypoints are prompted by ground-truth boxes "
              "(an oracle)")
    for task, iou_type in (("det", "bbox"), ("seg", "segm"), ("kpt", "keypoints")):
        if task in dataset.tasks:
            with open(os.path.join(out_dir, f"{iou_type}_results.json"), "w") as f:
                json.dump(res[iou_type], f)
            ap = coco_ap(dataset.coco_files[task], res[iou_type], iou_type, image_ids)
            metrics.update({f"{iou_type}_AP": ap[0], f"{iou_type}_AP50": ap[1],
                            f"{iou_type}_AP75": ap[2]})
    if "cap" in dataset.tasks:
        with open(os.path.join(out_dir, "captions_results.json"), "w") as f:
            json.dump([dict(image_id=i, caption=c) for i, c in res["captions"].items()], f)
        refs = {i: c for i in image_ids for c in [dataset.ann.captions(dataset.ann.row(i))] if c}
        predicted = {i: c for i, c in res["captions"].items() if i in refs}
        metrics["BLEU4"] = 100 * bleu4(predicted, refs) if refs else 0.0
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print_metrics(metrics)
    for image_id in image_ids[:show]:
        name, width, height = dataset.ann.image(dataset.ann.row(image_id))
        p = dict(preds[image_id])
        if "masks_rle" in p:
            p["masks"] = rle_to_masks(p.pop("masks_rle"), height, width)
        picture = Image.open(os.path.join(dataset.root, dataset.split, name)).convert("RGB")
        draw(picture, p, dataset.categories, score_thresh,
             os.path.join(out_dir, f"{image_id}.png"))
    return metrics


def print_metrics(m):
    print(f"{'task':10s}{'AP':>8s}{'AP50':>8s}{'AP75':>8s}")
    for t in ("bbox", "segm", "keypoints"):
        if f"{t}_AP" in m:
            print(f"{t:10s}" + "".join(f"{m[f'{t}_{k}']:8.1f}" for k in ("AP", "AP50", "AP75")))
    if "BLEU4" in m:
        print(f"{'caption':10s}BLEU-4 {m['BLEU4']:.1f}")
    print(f"{m['num_images']} images, {m['ms_per_image']:.1f} ms/image (model time)")


# -----------------------------------------------------------------------------
# Pictures, and inference on one's own images

def draw(picture, pred, categories, score_thresh, out_png, min_side=384):
    """Boxes with class names, masks, keypoints with the COCO skeleton, and the caption below,
    on the PIL picture. Small pictures are enlarged by an integer factor first, so that labels
    stay legible."""
    f = max(1, min_side // max(picture.size))
    picture = picture.resize((picture.width * f, picture.height * f))
    image = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    if f > 1:
        pred = dict(pred, boxes=pred["boxes"] * f)
        if "masks" in pred:
            pred["masks"] = pred["masks"].repeat_interleave(f, 1).repeat_interleave(f, 2)
        if "keypoints" in pred:
            pred["keypoints"] = pred["keypoints"] * torch.tensor([f, f, 1.0])
    if "boxes" in pred:
        keep = pred["scores"] >= score_thresh
        if "masks" in pred:
            m = pred["masks"][keep[: len(pred["masks"])]]
            if len(m):
                image = draw_segmentation_masks(image, m, alpha=0.4)
        kept = zip(pred["labels"][keep].tolist(), pred["scores"][keep].tolist())
        names = [f"{categories[l]['name']} {s:.2f}" for l, s in kept]
        if names:
            image = draw_bounding_boxes(image, pred["boxes"][keep], names, colors="yellow",
                                        width=2)
        if "keypoints" in pred:
            k = pred["keypoints"][keep[pred["kpt_index"]]]
            if len(k):
                edges = [(a - 1, b - 1) for a, b in coco.SKELETON]
                image = draw_keypoints(image, k[..., :2], connectivity=edges, colors="cyan",
                                       radius=2, width=1)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if "caption" in pred:
        strip = Image.new("RGB", (picture.width, 16 + picture.height), "white")
        strip.paste(picture, (0, 0))
        ImageDraw.Draw(strip).text((2, picture.height + 2), pred["caption"], fill="black")
        picture = strip
    picture.save(out_png)


def predict_images(model, tokenizer, categories, root, out_dir, batch_size, device, score_thresh):
    """Own images (the file `root`, or every image under the folder `root`), no annotations: a
    PNG of each in out_dir, in the same sub-folders, and predictions.jsonl (boxes, scores, class
    names, keypoints, caption; masks as COCO RLE)."""
    paths = image_paths(root)
    base = root if os.path.isdir(root) else os.path.dirname(root)
    cfg = model.cfg
    # the model's tasks; segmentation and keypoints need its detections, keypoints a person class
    prompted = "det" in cfg.tasks
    tasks = [t for t in cfg.tasks if t in ("det", "cap")
             or (prompted and (t == "seg" or model.vocab.person >= 0))]
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as out, torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            pictures = [data.open_photo(p) for p in chunk]
            samples = [data.inference_image(picture, cfg) for picture in pictures]
            batch = data.collate([(im, dict(size=size, orig_size=orig))
                                  for im, orig, size in samples])
            preds = model.predict(batch["images"].to(device), batch["padding"].to(device),
                                  batch["orig_size"], tasks=tasks, tokenizer=tokenizer)
            preds = [to_cpu(p) for p in preds]
            for path, picture, p in zip(chunk, pictures, preds):
                png = os.path.relpath(path, base) + ".png"   # photo.jpg and photo.png stay apart
                os.makedirs(os.path.dirname(os.path.join(out_dir, png)), exist_ok=True)
                draw(picture, p, categories, score_thresh, os.path.join(out_dir, png))
                record = prediction_record(path, p, categories, score_thresh)
                out.write(json.dumps(dict(record, picture=png)) + "\n")
    print(f"wrote {len(paths)} pictures and predictions.jsonl to {out_dir}")


def prediction_record(path, p, categories, score_thresh):
    keep = (p["scores"] >= score_thresh).nonzero()[:, 0].tolist()
    rec = dict(image=path, boxes=p["boxes"][keep].tolist(), scores=p["scores"][keep].tolist(),
               labels=[categories[l]["name"] for l in p["labels"][keep].tolist()])
    if "masks" in p:
        rec["masks"] = masks_to_rle(p["masks"][[k for k in keep if k < len(p["masks"])]])
    if "keypoints" in p:
        people = zip(p["keypoints"].tolist(), p["kpt_index"].tolist())
        rec["keypoints"] = [k for k, i in people if i in keep]
    if "caption" in p:
        rec["caption"] = p["caption"]
    return rec


IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_paths(path):
    """The image files under a folder, sub-folders included, or the one file given."""
    if os.path.isdir(path):
        paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(path)
                       for f in files if f.lower().endswith(IMAGE_TYPES))
    else:
        paths = [path] if os.path.isfile(path) else []
    if not paths:
        raise SystemExit(f"--images {path}: no image files ({', '.join(IMAGE_TYPES)}) found "
                         f"there or in its sub-folders")
    return paths


def check_out(out):
    """--out is a folder this process can write, before any prediction is made."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror})") from None


def check_ground_truth(ann, tasks):
    """pycocotools loses ground truth whose annotation id repeats (AP then looks better than
    it is), and COCOeval cannot score masks against the unusable ones dropped when reading."""
    for kind, ids in ann.duplicate_ids.items():
        if ids:
            raise SystemExit(f"{ann.files[kind]}: annotation ids {ids} occur more than once "
                             f"(-1: no 'id'); COCOeval would lose ground truth and score wrongly: "
                             f"give every annotation its own id")
    if "seg" in tasks and ann.bad_masks:
        raise SystemExit(f"{ann.files['instances']}: annotation {ann.bad_mask_example}: "
                         f"'segmentation' has a polygon of fewer than 3 points or an RLE that "
                         f"does not fit its image ({ann.bad_masks} such objects); COCOeval "
                         f"cannot score masks against them: fix or remove them")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--data", default=None,
                   help="COCO-layout root (default: the checkpoint's training data)")
    p.add_argument("--split", default="val2017")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="write this many pictures of predictions")
    p.add_argument("--images", default=None,
                   help="own images to predict on: a file, or a folder (sub-folders included)")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on a GPU, 1 on the CPU")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out (and count) missing or unreadable images instead of failing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    bad = [f"--{k.replace('_', '-')} must be >= 0" for k in ("max_images", "show", "workers")
           if getattr(args, k) < 0]
    if args.batch_size is not None and args.batch_size < 1:
        bad.append("--batch-size must be >= 1")
    if not 0 <= args.score_thresh <= 1:
        bad.append("--score-thresh must be in [0, 1]")
    if bad:
        raise SystemExit("bad settings: " + "; ".join(bad))
    runtime.check_device(args.device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")
    check_out(out)

    _, _, args.device = runtime.init_processes(args.device)
    args.batch_size = args.batch_size or (8 if args.device.startswith("cuda") else 1)
    if args.device.startswith("cuda"):
        runtime.cuda_settings()
    ckpt = runtime.load_checkpoint(args.ckpt)
    model, tokenizer = runtime.model_from_checkpoint(ckpt, args.device)
    if args.images:
        predict_images(model, tokenizer, ckpt["categories"], args.images, out,
                       args.batch_size, args.device, args.score_thresh)
    else:
        trained_on = ckpt.get("train", {}).get("data")
        root = args.data or trained_on or os.environ.get("COCO_ROOT", "data/coco")
        data.check_root(root, args.split)
        try:
            dataset = data.CocoMultiTask(root, args.split, model.cfg, tokenizer, train=False,
                                         categories=ckpt["categories"], targets=False,
                                         skip_bad_images=args.skip_bad_images)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        check_ground_truth(dataset.ann, dataset.tasks)

        evaluate(model, dataset, tokenizer, out, args.batch_size, args.workers, args.max_images,
                 args.show, args.device, args.score_thresh)

    runtime.finish_processes()


if __name__ == "__main__":
    main()

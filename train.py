"""Train MAD on COCO, or on the synthetic set: the configuration, then the training loop.

    python train.py --demo                               # synthetic set, tiny model: CPU is enough
    torchrun --nproc_per_node 8 train.py --backbone r50  # COCO in data/coco ($COCO_ROOT)
    torchrun --nnodes 2 --node_rank N --master_addr HOST0 --nproc_per_node 8 \\
        train.py --backbone swin_b --out /shared/swin      # two nodes
    python train.py --backbone r50 --accum-steps 8       # the paper's batch 16 on one GPU
    python train.py --out runs/mad --resume              # continue runs/mad, its own settings

Every field of mad.Config and TrainConfig is a flag (--mask-ratio 0.6, --cap-ratios 1,0.7 ...);
--backbone picks the model preset and the paper's schedule (Table 9) first, explicit flags win.
A run lives in --out: the same command started again (a requeued job, torchrun --max-restarts)
continues from OUT/last.pt, exactly (runtime.py holds that machinery).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
import mad
import runtime


@dataclass
class TrainConfig:
    data: str = os.environ.get("COCO_ROOT", "data/coco")   # COCO-layout root, or "synthetic"
    out: str = "runs/mad"             # checkpoints, log.jsonl, evaluations (all nodes share it)
    epochs: int = 50
    lr_drop: tuple = (40,)            # epochs of the x0.1 learning-rate drops (schedule "step")
    lr_schedule: str = "step"         # step: x0.1 at each lr_drop (paper) | cosine: to 0 at the end
    warmup: int = 0                   # steps of linear learning-rate warm-up
    hold: int = 0                     # cosine: steps at the full rate after the warm-up
    batch_size: int = 16              # global: over all processes and accumulation steps
    accum_steps: int = 1              # gradient accumulation (the paper's batch on fewer GPUs)
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    clip: float = 0.1                 # gradient norm clipping
    amp: "bool | None" = None         # default: on CUDA (bf16 where native, else fp16 + GradScaler)
    compile: bool = False             # torch.compile the transformer encoder and the decoder
    max_steps: int = 0                # stop after this many optimizer steps (0: run all epochs)
    save_every: int = 0               # also save last.pt every N steps (0: once per epoch)
    eval_every: int = 0               # evaluate on val2017 every N epochs (0: never)
    eval_images: int = 0              # cap on images for those evaluations (0: all)
    show: int = 0                     # pictures of predictions written at each evaluation
    log_every: int = 20
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    workers: int = 4
    seed: int = 0
    resume: bool = False              # continue OUT/last.pt with its own settings
    demo: bool = False                # synthetic set, tiny model, 1,800 steps, then an evaluation
    spm_vocab: int = 8000             # SentencePiece vocabulary trained on the train captions
    caption_spm: str = ""             # ... or this SentencePiece model file (pad 0, eos 1, unk 2)
    skip_bad_images: bool = False     # skip (and count) missing or corrupt images, do not fail
    augment: bool = True              # flip, crop, multi-scale / LSJ (off: the evaluation resize)
    pretrained: bool = True           # torchvision ImageNet backbone weights (needs a network once)
    backbone_weights: str = ""        # ... or a local state-dict file of them
    pg_timeout: float = 30.0          # minutes a collective waits for another process, then fails


# Per backbone: the paper's Table 9, and for Swin-B the authors' schedule, where the paper
# disagrees with itself (300 epochs, x0.1 at 200 in 4.1, at 240 in Table 9): 1.125M iterations
# of batch 32, x0.1 at 750k and again at 975k, a 250-iteration warm-up; in epochs of COCO
# train2017's 3,696 steps: 304, at 203 and 264. The tiny preset trains from random weights.
SCHEDULES = {
    "r50": dict(epochs=50, lr_drop=(40,), batch_size=16),
    "swin_b": dict(epochs=304, lr_drop=(203, 264), batch_size=32, warmup=250),
    "swin_b384": dict(epochs=304, lr_drop=(203, 264), batch_size=32, warmup=250),
    "vit_b": dict(epochs=100, lr_drop=(80,), batch_size=32),
    "tiny": dict(epochs=12, lr_drop=(10,), batch_size=16, lr=5e-4, backbone_lr=5e-4, clip=1.0,
                 workers=1, spm_vocab=200, log_every=25, pretrained=False),
}

# The demo: the tiny model at 128 px with a 2-layer decoder (more images in its minutes:
# RESULTS.md), no augmentation, a fixed number of steps (max_steps ends it; epochs is no
# limit). The same run on every machine: it takes 7 to 11 minutes on 2 CPU cores, and the log
# prints the time left as it goes.
DEMO = dict(data="synthetic", out="runs/demo", backbone="tiny", dec_layers=2, eval_every=0, show=4,
            augment=False, lr=1e-3, backbone_lr=1e-3, warmup=100, hold=200, lr_schedule="cosine",
            pretrained=False, epochs=10 ** 6, batch_size=8, max_steps=1800)


def demo_workers(device):
    """The demo's data workers: one beside the training process on a CPU, more to feed a GPU.
    The workers change the speed, never the run."""
    cores = os.cpu_count() or 2
    return min(8, cores - 1) if device.startswith("cuda") else 1


# -----------------------------------------------------------------------------
# Configuration: dataclass defaults <- backbone preset and schedule <- --demo <- explicit flags

def parse_args(argv=None):
    """-> (mad.Config, TrainConfig, {flag: value} of the flags given explicitly)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(mad.Config) + dataclasses.fields(TrainConfig)}
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        if f.type in (bool, "bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(f.default, tuple):
            kind = type(f.default[0])
            p.add_argument(flag, type=lambda s, k=kind: tuple(k(x) for x in s.split(",")),
                           default=None, metavar="A,B,...")
        else:
            p.add_argument(flag, type=type(f.default), default=None)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    settings = {}
    if given.get("demo"):
        device = given.get("device", TrainConfig.device)
        settings = dict(DEMO, workers=demo_workers(device))
    backbone = given.get("backbone", settings.get("backbone", mad.Config.backbone))
    check_choice("backbone", backbone, mad.PRESETS)
    settings = {**mad.PRESETS[backbone], **SCHEDULES[backbone], **settings, **given}
    cfg = mad.Config(**{k: v for k, v in settings.items() if k in mad.Config.__dataclass_fields__})
    tc = TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
    return cfg, tc, given


def check_settings(cfg, tc):
    """Every setting in its range or among its choices, before any data is read or any process
    group joined: a mistyped flag stops the run at once, naming the flag."""
    check_choice("decoder", cfg.decoder, mad.DECODERS)
    check_choice("lr_schedule", tc.lr_schedule, ("step", "cosine"))
    check_choice("mask_strategy", cfg.mask_strategy, mad.PARTIAL_MASKS)
    check_choice("remask_average", cfg.remask_average, mad.ENSEMBLE_WEIGHTS)
    check_choice("det_score", cfg.det_score, mad.DETECTION_SCORES)
    check_choice("scale_jitter", cfg.scale_jitter, ("multiscale", "lsj"))
    for task in cfg.tasks or ("(none)",):
        check_choice("tasks", task, mad.TASKS)
    positive = dict(lr=tc.lr, batch_size=tc.batch_size, accum_steps=tc.accum_steps,
                    epochs=tc.epochs, num_bins=cfg.num_bins, num_queries=cfg.num_queries,
                    grid_size=cfg.grid_size, caption_len=cfg.caption_len, clip=tc.clip,
                    image_size=cfg.image_size, log_every=tc.log_every, spm_vocab=tc.spm_vocab)
    not_negative = dict(backbone_lr=tc.backbone_lr, weight_decay=tc.weight_decay,
                        warmup=tc.warmup, hold=tc.hold, lr_drop=min(tc.lr_drop, default=0),
                        max_steps=tc.max_steps, workers=tc.workers, save_every=tc.save_every,
                        eval_every=tc.eval_every, eval_images=tc.eval_images, show=tc.show)
    ratios = dict(mask_ratio=(cfg.mask_ratio,), kpt_ratios=cfg.kpt_ratios,
                  cap_ratios=cfg.cap_ratios)
    bad = [f"{runtime.flag(k)} {v}: must be > 0" for k, v in positive.items() if not v > 0]
    bad += [f"{runtime.flag(k)} {v}: must be >= 0" for k, v in not_negative.items() if not v >= 0]
    bad += [f"{runtime.flag(k)} {','.join(map(str, v))}: ratios must be in (0, 1]"
            for k, v in ratios.items() if not v or not all(0 < r <= 1 for r in v)]
    if len(cfg.task_weights) != len(mad.TASKS):
        bad.append(f"--task-weights: one weight per task ({', '.join(mad.TASKS)})")
    if tc.batch_size > 0 and tc.accum_steps > 0 and tc.batch_size % tc.accum_steps:
        bad.append(f"--batch-size {tc.batch_size} is not divisible by --accum-steps "
                   f"{tc.accum_steps}")
    if tc.caption_spm and not os.path.isfile(tc.caption_spm):
        bad.append(f"--caption-spm {tc.caption_spm}: no such file")
    if bad:
        raise SystemExit("bad settings: " + "; ".join(bad))
    runtime.check_device(tc.device)


def check_choice(name, value, choices):
    if value not in choices:
        allowed = ", ".join(map(str, choices))
        raise SystemExit(f"{runtime.flag(name)} {value}: choose one of {allowed}")


# -----------------------------------------------------------------------------
# Training: 3.4 task-mixed sampling, every image trains all the tasks it has

def main(argv=None):
    cfg, tc, given = parse_args(argv)
    check_settings(cfg, tc)
    rank, world, device = runtime.init_processes(tc.device, tc.pg_timeout)
    if device.startswith("cuda"):
        runtime.cuda_settings()                          # TF32; no per-shape cuDNN attention plans
    ckpt, path = runtime.find_run(tc.out, tc.resume, rank)
    if ckpt is not None:
        cfg, tc = runtime.continue_run(ckpt, cfg, tc, given, path)
    tc.data = runtime.prepare_data(tc.data)              # "synthetic" becomes its directory
    tokenizer = runtime.caption_tokenizer(tc.data, tc.out, tc.spm_vocab, tc.caption_spm,
                                          cfg.tasks, ckpt)
    dataset = training_set(cfg, tc, tokenizer, ckpt, path)
    model, optimizer, weights = start_model(cfg, tc, dataset, device, ckpt)

    # DDP and AMP. Autocast: bf16, or fp16 whose loss a GradScaler scales; on a CPU only with --amp
    amp = runtime.autocast_dtype(device, tc.amp)
    autocast = torch.autocast(device.split(":")[0], dtype=amp) if amp else nullcontext()
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp == torch.float16)
    if tc.batch_size % (world * tc.accum_steps):
        raise SystemExit(f"--batch-size {tc.batch_size} must be divisible by processes ({world}) x "
                         f"--accum-steps ({tc.accum_steps})")
    torch.manual_seed(tc.seed + rank)                    # masking differs across ranks
    step = 0
    if ckpt is not None:
        step = runtime.restore(ckpt, model, optimizer, scaler, tc.seed, rank, device)
        weights = f"resumed at step {step}"
    if tc.compile:
        runtime.compile_model(model)
    ddp_model = model
    if world > 1:
        gpu = [torch.cuda.current_device()] if device.startswith("cuda") else None
        ddp_model = DDP(model, device_ids=gpu)

    steps_per_epoch = len(dataset) // tc.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one global batch "
                         f"of {tc.batch_size}")
    total = tc.epochs * steps_per_epoch
    total = min(tc.max_steps, total) if tc.max_steps else total
    if rank == 0:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast",
                     torch.float16: "fp16 autocast + GradScaler"}[amp]
        micro = tc.batch_size // (world * tc.accum_steps)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{cfg.backbone}: {weights}; {precision}; {len(dataset):,} images, tasks "
              f"{', '.join(dataset.tasks)}; {world} process(es) x {micro} images "
              f"x {tc.accum_steps} accumulation = global batch {tc.batch_size}; "
              f"{steps_per_epoch:,} steps/epoch, "
              f"{total:,} steps; {params:.1f}M parameters", flush=True)
    runtime.warn_small_shm(tc.workers)
    train(ddp_model, model, optimizer, scaler, autocast, dataset, tokenizer, cfg, tc, step, total,
          path, rank, world, device)
    if tc.demo:
        run_evaluation(model, cfg, tokenizer, dataset.categories, tc, device, "final")
    runtime.finish_processes()


def train(ddp_model, model, optimizer, scaler, autocast, dataset, tokenizer, cfg, tc, step, total,
          path, rank, world, device):
    """The loop: optimizer steps from `step` to `total`, a log line every log_every steps, last.pt
    at each epoch's end (and every save_every steps), an evaluation every eval_every epochs."""
    steps_per_epoch = len(dataset) // tc.batch_size
    micro = tc.batch_size // (world * tc.accum_steps)

    def save(epoch):
        runtime.save_run(path, model, optimizer, scaler, cfg, tc, dataset, tokenizer, step, epoch,
                         device)
    t0, start_step, logged, seen = time.time(), step, step, 0
    sums = torch.zeros(1 + len(dataset.tasks))           # total and task losses since the last log
    while step < total:
        epoch = step // steps_per_epoch
        start = (step - epoch * steps_per_epoch) * tc.batch_size
        batches = epoch_batches(dataset, tc, epoch, start, rank, world, micro, device)
        while step < total and step < (epoch + 1) * steps_per_epoch:
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, steps_per_epoch, tc)
            micro_batches = [to_device(next(batches), device) for _ in range(tc.accum_steps)]
            losses = train_step(ddp_model, model, micro_batches, dataset.tasks, optimizer, scaler,
                                autocast, tc.clip)
            if not torch.isfinite(losses).all():         # the update was skipped: weights are fine
                stop_on_non_finite(losses, dataset.tasks, step, epoch, path)
            sums += losses
            seen += sum(len(b["images"]) for b in micro_batches) * world
            step += 1
            if step % tc.log_every == 0 or step == total:
                if rank == 0:
                    elapsed = time.time() - t0
                    eta = elapsed / (step - start_step) * (total - step)
                    log(step, total, epoch, sums / (step - logged), dataset.tasks, optimizer,
                        seen / elapsed, eta, tc.out)
                sums.zero_()
                logged = step
            if tc.save_every and step % tc.save_every == 0:
                save(epoch)
        del batches                                      # this epoch's workers end before the next
        if step % steps_per_epoch == 0:                  # end of an epoch
            save(epoch + 1)
            if tc.eval_every and (epoch + 1) % tc.eval_every == 0:
                run_evaluation(model, cfg, tokenizer, dataset.categories, tc, device,
                               f"epoch{epoch + 1}")
    if step % steps_per_epoch:                           # stopped by --max-steps mid-epoch
        save(step // steps_per_epoch)


def training_set(cfg, tc, tokenizer, ckpt, path):
    """train2017 of tc.data with its targets; a resumed run's must be the run's own."""
    try:
        dataset = data.CocoMultiTask(tc.data, "train2017", cfg, tokenizer, train=True, seed=tc.seed,
                                     augment=tc.augment, skip_bad_images=tc.skip_bad_images,
                                     categories=ckpt["categories"] if ckpt else None)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if ckpt is not None and ckpt.get("images", len(dataset)) != len(dataset):
        raise SystemExit(f"{path}: the run trained on {ckpt['images']} images; "
                         f"{tc.data} has {len(dataset)}")
    return dataset


def start_model(cfg, tc, dataset, device, ckpt):
    """The network (the same initial weights on every rank; ImageNet backbone weights for a new run
    of a paper preset) and AdamW with its parameter groups. -> (model, optimizer, what the weights
    are)."""
    torch.manual_seed(tc.seed)
    model = mad.build(cfg, dataset.vocab).to(device)
    weights = "random init"
    if (tc.pretrained or tc.backbone_weights) and ckpt is None:
        weights = runtime.load_backbone_weights(model.backbone, cfg.backbone,
                                                tc.backbone_weights or None)
    groups = model.param_groups(tc.lr, tc.backbone_lr, tc.weight_decay)
    # fused: one kernel updates all parameters
    optimizer = torch.optim.AdamW(groups, fused=device.startswith("cuda"))
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]                           # lr_factor scales it at every step
    return model, optimizer, weights


def rank_order(n, seed, epoch, rank, world, start):
    """The images a process reads in an epoch from global position `start` on: the epoch's
    permutation of the n images, seeded by (seed, epoch), dealt round-robin, so that global step s
    reads positions s*B .. (s+1)*B - 1 of it whatever the number of processes."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[start + rank::world].tolist()


def epoch_batches(dataset, tc, epoch, start, rank, world, micro, device):
    """This process's batches of an epoch, from global position `start` on (rank_order)."""
    dataset.set_epoch(epoch)                             # augmentation: from (seed, epoch, index)
    order = rank_order(len(dataset), tc.seed, epoch, rank, world, start)
    worker_seeds = torch.Generator().manual_seed(tc.seed + epoch)
    loader = torch.utils.data.DataLoader(
        dataset, micro, sampler=order, num_workers=tc.workers, collate_fn=pad_to_128,
        drop_last=True, pin_memory=device.startswith("cuda"), generator=worker_seeds)
    return iter(loader)


def pad_to_128(samples):
    """Training batches are padded to a multiple of 128 pixels: multi-scale images then come in a
    few batch shapes, and GPU libraries (cuDNN) reuse their per-shape plans instead of building new
    ones at almost every step."""
    return data.collate(samples, multiple=128)


def to_device(batch, device):
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
            for k, v in batch.items()}


def lr_factor(step, total, steps_per_epoch, tc):
    """Learning rate of optimizer step `step` (0-based) as a share of the base rate: a linear
    warm-up over tc.warmup steps, then either x0.1 at each epoch of tc.lr_drop (the paper's step
    schedule) or, after tc.hold steps at the full rate, a cosine to 0 at the last step."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    if tc.lr_schedule == "cosine":
        start = tc.warmup + tc.hold
        if step < start:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - start) / max(total - start, 1)))
    return 0.1 ** sum(step >= epoch * steps_per_epoch for epoch in tc.lr_drop)


def train_step(ddp_model, model, micro_batches, tasks, optimizer, scaler, autocast, clip):
    """One optimizer step over K micro-batches (K = 1 without accumulation): forward, eq. 1,
    backward, unscale, clip, step. Returns the mean total and per-task losses (CPU, averaged
    over ranks); when any is non-finite the update is skipped. With fp16, the GradScaler skips a
    step whose gradients overflow and lowers its scale."""
    K, device = len(micro_batches), micro_batches[0]["images"].device
    normalizers, rng = None, None
    if K > 1:
        normalizers, rng = count_normalizers(model, micro_batches, tasks, autocast)
    sums = torch.zeros(1 + len(tasks), device=device)
    for k, batch in enumerate(micro_batches):
        if K > 1:
            runtime.set_rng_state(rng[k], device)        # the masks the counting pass drew
        hold_gradients = ddp_model is not model and k < K - 1    # DDP: reduce once, at the last
        with (ddp_model.no_sync() if hold_gradients else nullcontext()), autocast:
            nll, counts = ddp_model(batch, tasks)
            # eq. 1's normalizers: each (task, layer)'s counted positions over all ranks (their
            # mean, as DDP averages the gradients)
            counted = normalizers or {t: runtime.all_reduce_mean(c) for t, c in counts.items()}
            loss, parts = mad.weighted_loss(nll, counted, model.cfg.task_weights)
        scaler.scale(loss / K).backward()
        sums += torch.stack([loss.detach(), *(parts[t] for t in tasks)]).float() / K
    sums = runtime.all_reduce_mean(sums).cpu()           # the same on every rank: all stop together
    if torch.isfinite(sums).all():
        scaler.unscale_(optimizer)                       # before clipping: clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return sums


def count_normalizers(model, micro_batches, tasks, autocast):
    """With accumulation, eq. 1 normalizes over all K micro-batches, as one batch K times the
    size would: the positions each (task, layer) counts (which depend on the random masks) are
    counted first, in a no-grad pass. -> (normalizers, the RNG state before each micro-batch, so
    that the real pass draws the same masks)."""
    device, rng, counts = micro_batches[0]["images"].device, [], []
    for batch in micro_batches:
        rng.append(runtime.rng_state(device))
        with torch.no_grad(), autocast:
            counts.append(model(batch, tasks)[1])
    K = len(micro_batches)
    return {t: runtime.all_reduce_mean(sum(c[t] for c in counts)) / K for t in tasks}, rng


def stop_on_non_finite(losses, tasks, step, epoch, path):
    bad = [f"{t}={v:.4g}" for t, v in zip(tasks, losses[1:].tolist()) if not math.isfinite(v)]
    raise SystemExit(f"non-finite loss at step {step + 1} (epoch {epoch}): "
                     f"{', '.join(bad) or 'total'}; stopped without saving, "
                     f"{path} holds the last good state")


def log(step, total, epoch, avg, tasks, optimizer, images_per_s, eta, out):
    losses = dict(zip(("loss", *tasks), avg.tolist()))
    lr = optimizer.param_groups[0]["lr"]
    shown = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
    print(f"step {step}/{total} epoch {epoch} {shown} lr {lr:.1e} {images_per_s:.1f} img/s "
          f"ETA {eta / 60:.1f} min", flush=True)

    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(dict(step=step, epoch=epoch, lr=lr, images_per_s=images_per_s, **losses))
                + "\n")


def run_evaluation(model, cfg, tokenizer, categories, tc, device, name):
    """Every process predicts its share of val2017; rank 0 scores while the others wait for it on
    the wait group (a long timeout), never inside a collective of the training's process group."""
    dataset = data.CocoMultiTask(tc.data, "val2017", cfg, tokenizer, train=False,
                                 categories=categories, targets=False)
    out = os.path.join(tc.out, f"eval_{name}")
    metrics = evaluate.evaluate(model, dataset, tokenizer, out, batch_size=8,
                                workers=min(tc.workers, 2), max_images=tc.eval_images, show=tc.show,
                                device=device)
    if metrics is not None:
        print(f"evaluation written to {out}", flush=True)
    runtime.barrier()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
